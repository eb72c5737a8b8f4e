"""The job entry point's own behaviour, without Ray."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from cluster import entry
from tests.conftest import BAD_JOB_INPUT

ROOT = Path(__file__).resolve().parents[2]


def _job_main(module: str) -> Callable[[list[str]], int]:
    return importlib.import_module(module).main


@pytest.mark.parametrize("module", ["jobs.prepare", "jobs.pretrain", "jobs.finetune", "tune.sweep"])
def test_each_job_s_help_names_the_module_it_runs_as_and_keeps_its_usage_lines(module, capsys):
    # Regression: `python -m tune.sweep --help` said `usage: python -m jobs.sweep`, and the usage
    # lines of the job's docstring ran together into one paragraph. (That `python -m <job>` runs
    # this main: tests/integration/test_entrypoints.py.)
    with pytest.raises(SystemExit) as exit_:
        _job_main(module)(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: python -m {module} "), out[:200]
    assert f"\n    python -m {module} --config configs/" in out, out


@pytest.mark.parametrize("module, args, error, run_folder", BAD_JOB_INPUT)
def test_bad_input_is_reported_before_the_job_connects_to_ray(tmp_path, monkeypatch, capsys, module, args, error,
                                                              run_folder):
    # RAY_ADDRESS names a port nothing listens on: a job that connected first would fail on that
    # (cluster.runtime checks the address before ray.init); it must fail on its input, start no Ray
    # of its own and leave no run folder. As in a fresh job process: this test session may be
    # connected to a Ray of its own (`make test` runs the integration tests first), and any ray.init
    # (raylm's, or Ray's auto-init on a first Ray API call) fails the test.
    for key in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: pytest.fail(f"ray.init{a, kw} was called"))
    monkeypatch.setattr(entry, "follow_replaced_cwd", lambda *a, **kw: None)  # no thread left behind
    code = _job_main(module)(args)  # a traceback would be an exception raised here
    err = capsys.readouterr().err
    assert code in (1, 2), err
    assert err.strip().splitlines()[-1].startswith(error), err
    assert not (tmp_path / run_folder).exists()


def test_ray_data_s_report_of_a_raylm_error_raised_in_a_task_is_dropped():
    # Regression: a corrupt line deep in a JSON lines file failed the prepare job with Ray Data's
    # "Exception occurred in Ray Data or Ray Core internal code ... please open an issue" and a
    # ~170-line traceback before raylm's one line naming the file and line.
    import logging

    from cluster.entry import RAY_DATA_ERROR_LOGGERS, setup_logging
    from cluster.errors import CorpusError

    setup_logging()
    setup_logging()  # idempotent: one filter per logger
    executor, exceptions = (logging.getLogger(n) for n in RAY_DATA_ERROR_LOGGERS)
    assert len(executor.filters) == len(exceptions.filters) == 1
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    for logger in (executor, exceptions):
        logger.addHandler(handler)
    try:
        for raised in (CorpusError("docs.jsonl:3001: not valid JSON"), RuntimeError("a real Ray failure")):
            try:
                raise raised
            except Exception as e:
                executor.error("An exception was raised from a task", exc_info=e)
                exceptions.error("Exception occurred in Ray Data or Ray Core internal code")
                exceptions.exception("Full stack trace:")
    finally:
        for logger in (executor, exceptions):
            logger.removeHandler(handler)
    # the raylm error's three records are gone; the other error keeps all three
    assert [r.exc_info[1] if r.exc_info else None for r in records] == [raised, None, raised]


def test_a_ray_address_nothing_answers_at_fails_at_once(monkeypatch):
    # Regression: with RAY_ADDRESS naming a head that is down, every job waited in Ray's GCS client
    # retries for over 5 minutes (killed at 300 s) before saying anything.
    import socket
    import time

    from cluster import runtime
    from cluster.errors import JobError

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port_closed = closed.getsockname()[1]
    closed.close()
    try:
        runtime.check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")  # a head is up: Ray takes over
        runtime.check_reachable(f"ray://127.0.0.1:{listening.getsockname()[1]}")
    finally:
        listening.close()
    runtime.check_reachable("auto")  # Ray resolves it from the local cluster's file and fails fast itself
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port_closed}")
    # as in a fresh job process (the test session may have a Ray of its own); Ray is never asked
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda **kwargs: pytest.fail(f"ray.init({kwargs}) was called"))
    t0 = time.time()
    with pytest.raises(JobError, match=f"RAY_ADDRESS=127.0.0.1:{port_closed}: nothing accepts connections at "
                                       f"127.0.0.1:{port_closed}"):
        runtime.connect()
    assert time.time() - t0 < 10
    with pytest.raises(JobError, match="nothing accepts connections at ::1:"):
        runtime.check_reachable(f"[::1]:{port_closed}")
