"""Several raylm jobs at once on one machine, each on the embedded Ray it starts (no RAY_ADDRESS):
each pins its processes to its own Ray, so Ray's helpers that look for "the" local Ray never find
two, and both finish with no traceback in their output."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx

from cluster.runtime import free_ports
from tests.conftest import PYTHON, REPO

PRETRAIN = ["-m", "jobs.pretrain", "--config", "configs/gpt-tiny.yaml", "--set", "corpus=t-gpt",
            "--set", "train.max_steps=20", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
            "--set", "train.eval_batches=2", "--set", "scaling.threads_per_worker=1"]


def _alone_env(**extra: str) -> dict[str, str]:
    """The test session's environment without its Ray: a job started with it starts its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _start(args: list[str], out: str, env: dict[str, str]) -> subprocess.Popen:
    with open(out, "w") as f:
        return subprocess.Popen([PYTHON, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _clean(path: str) -> str:
    text = open(path).read()
    assert "Traceback" not in text and "ConnectionError" not in text, text[-4000:]
    return text


def test_two_pretraining_runs_at_once_each_on_its_own_ray(gpt_corpus, tmp_path):
    runs = [_start([*PRETRAIN, "--set", f"name=t-side-{i}"], str(tmp_path / f"run-{i}.out"), _alone_env())
            for i in (1, 2)]
    for i, proc in enumerate(runs, start=1):
        assert proc.wait(timeout=600) == 0, open(tmp_path / f"run-{i}.out").read()[-4000:]
        assert _clean(str(tmp_path / f"run-{i}.out")).rstrip().endswith("summary.json")


def test_a_pretraining_run_beside_raylm_serve_run(gpt_corpus, tmp_path):
    from serve import tiny

    models = tmp_path / "serving"
    tiny.publish_all(str(tmp_path / "ckpts"), root=str(models / "registry"))
    (port,) = free_ports(1)
    server = _start(["-m", "serve.cli", "run", "--port", str(port), "--set", "models=[bert-cls]"],
                    str(tmp_path / "serve.out"), _alone_env(RAYLM_STORAGE=str(models)))
    run = _start([*PRETRAIN, "--set", "name=t-side-serve"], str(tmp_path / "run.out"), _alone_env())
    try:
        assert run.wait(timeout=600) == 0, open(tmp_path / "run.out").read()[-4000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "bert-cls", "inputs": "a good day"},
                       timeout=120)
        assert r.status_code == 200, r.text
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    _clean(str(tmp_path / "run.out"))
    _clean(str(tmp_path / "serve.out"))

