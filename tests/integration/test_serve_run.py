"""`serve run serve.app:app`, Ray Serve's own command, with more models than one CPU each would fit:
the app sizes its replicas to the cluster and serves them all, instead of Serve waiting forever for
replicas it cannot place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import REPO, subprocess_env

SERVE = os.path.join(os.path.dirname(sys.executable), "serve")


def test_serve_run_app_serves_more_models_than_cpus(ray_session, tmp_path):
    from ray import serve

    from serve import tiny

    storage = tmp_path / "storage"
    models = tiny.publish_all(str(tmp_path / "ckpts"), root=str(storage / "registry"))
    assert len(models) == 4  # 4 models + the ingress at one CPU each: more than the shared Ray's 3
    env = {**subprocess_env(ray_session), "RAYLM_STORAGE": str(storage)}
    env.pop("RAYLM_API_KEY", None)
    log = tmp_path / "serve-run.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([SERVE, "run", "serve.app:app"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, served = time.time() + 120, []
        while time.time() < deadline and proc.poll() is None:
            try:
                served = [m["id"] for m in httpx.get("http://127.0.0.1:8000/v1/models", timeout=5).json()["data"]]
                r = httpx.post("http://127.0.0.1:8000/v1/classify", json={"model": "bert-cls", "inputs": "a good day"},
                               timeout=30)
                if r.status_code == 200 and len(served) == 4:
                    break
            except (httpx.HTTPError, ValueError, KeyError):  # not up yet: no answer, or not JSON
                pass
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert sorted(served) == sorted(models), log.read_text()[-3000:]
        replicas = serve.status().applications["default"].deployments
        assert all(d.status == "HEALTHY" for d in replicas.values()), replicas
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run deletes its app
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        serve.shutdown()
