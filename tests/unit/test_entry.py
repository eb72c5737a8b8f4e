"""The job entry point's own behaviour, without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_REPLACE = textwrap.dedent("""
    import os, shutil, sys, time
    from cluster.entry import follow_replaced_cwd
    work = sys.argv[1]
    os.makedirs(work)
    os.chdir(work)
    if sys.argv[2] == "follow":
        follow_replaced_cwd(interval_s=0.05)
    shutil.rmtree(work)  # what Ray does to a job's working_dir when it unpacks the package again
    os.makedirs(work)
    open(os.path.join(work, "marker"), "w").close()
    deadline = time.time() + float(sys.argv[3])
    while time.time() < deadline and not os.path.exists("marker"):
        time.sleep(0.05)
    print(os.path.exists("marker"), os.getcwd() if os.path.exists("marker") else "-")
""")


def _run(tmp_path: Path, mode: str, wait_s: float) -> str:
    out = subprocess.run([sys.executable, "-c", _REPLACE, str(tmp_path / "pkg"), mode, str(wait_s)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_job_follows_its_working_directory_when_ray_replaces_it(tmp_path):
    """`ray job submit --working-dir` jobs start inside a directory Ray may rmtree and unpack again
    under the running driver; the entry point re-enters the new one (relative paths and
    os.getcwd() work again) instead of staying in the deleted one."""
    assert _run(tmp_path, "follow", wait_s=20) == f"True {tmp_path / 'pkg'}"
    assert _run(tmp_path / "again", "stay", wait_s=1) == "False -"  # what a driver without it is left with


def test_each_job_s_help_names_the_module_it_runs_as_and_keeps_its_usage_lines():
    # Regression: `python -m tune.sweep --help` said `usage: python -m jobs.sweep`, and the usage
    # lines of the job's docstring ran together into one paragraph.
    for module in ("jobs.prepare", "jobs.pretrain", "jobs.finetune", "tune.sweep"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: python -m {module} "), out.stdout[:200]
        assert f"\n    python -m {module} --config configs/" in out.stdout, out.stdout


@pytest.mark.parametrize("module, args, error, run_folder", [
    ("jobs.pretrain", ["--config", "configs/gpt-tiny.yaml", "--set", "corpus=no-such-corpus"],
     "error: corpus 'no-such-corpus' not found", "pretrain"),
    ("jobs.prepare", ["/no/such/notes.txt", "--name", "notes"],
     "error: source 'files': '/no/such/notes.txt' does not exist", "prepare"),
    ("jobs.finetune", ["--config", "configs/finetune-topic-tiny.yaml", "--set", "model.checkpoint=./no-such-ckpt"],
     "error: model.checkpoint './no-such-ckpt' does not exist", "finetune"),
    ("tune.sweep", ["--config", "configs/tune-topic-tiny.yaml", "--set", "metric=val_f1"],
     "  - metric 'val_f1' is never reported by a classification trial", "tune"),
])
def test_bad_input_is_reported_before_the_job_connects_to_ray(tmp_path, module, args, error, run_folder):
    # RAY_ADDRESS names a port nothing listens on: a job that connected first would fail (or wait)
    # on that; it must fail on its input, start no Ray of its own and leave no run folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="127.0.0.1:9", RAYLM_STORAGE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode in (1, 2), out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(error), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / run_folder).exists()


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
