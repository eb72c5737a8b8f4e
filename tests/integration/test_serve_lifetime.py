"""`raylm serve run` ends with everything it started, Serve's HAProxy included: on SIGTERM, and when
its Ray is killed under it (as `ray stop --force` kills Ray's processes and not HAProxy, which then
held the port and answered 500 for as long as nobody found it). A start on a held port says which
process holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from cluster.runtime import free_ports
from tests.conftest import PYTHON, REPO


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory) -> dict[str, str]:
    from serve import tiny

    storage = tmp_path_factory.mktemp("lifetime")
    tiny.publish_all(str(storage / "ckpts"), root=str(storage / "registry"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    return {**env, "RAYLM_STORAGE": str(storage), "PYTHONPATH": REPO}


def _serve(env: dict[str, str], port: int, out) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-m", "serve.cli", "run", "--port", str(port), "--set", "models=[bert-cls]"],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "bert-cls", "inputs": "a day"},
                           timeout=10)
            if r.status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    out.flush()
    raise AssertionError(f"raylm serve run did not serve (exit {proc.poll()}): {open(out.name).read()[-3000:]}")


def _session(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every live process of the app's process session but the command itself."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.pid != proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == proc.pid:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def _gone_within(proc: subprocess.Popen, port: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and (proc.poll() is None or _session(proc)):
        time.sleep(0.5)
    left = [f"{p.pid} {p.name()}" for p in _session(proc)]
    assert proc.poll() is not None and not left, f"still running after {seconds:.0f} s: {left}"
    from serve.lifetime import listeners

    assert not listeners(port)


def test_ray_killed_under_serve_run_leaves_no_process_and_a_free_port(registry_env, tmp_path):
    (port,) = free_ports(1)
    with open(tmp_path / "serve.out", "w") as out:
        proc = _serve(registry_env, port, out)
    haproxy = [p for p in _session(proc) if "haproxy" in p.name()]
    assert haproxy, "Serve's high-throughput mode runs HAProxy on the port"
    for p in _session(proc):  # what `ray stop --force` kills: Ray's processes, not HAProxy
        if "haproxy" not in p.name():
            p.kill()
    _gone_within(proc, port, 30)
    assert proc.returncode == 1
    assert "Ray went away under this app" in (tmp_path / "serve.out").read_text()
    with open(tmp_path / "again.out", "w") as out:  # the port is usable again at once
        again = _serve(registry_env, port, out)
    os.kill(again.pid, signal.SIGTERM)  # and SIGTERM ends it as cleanly
    _gone_within(again, port, 30)
    assert again.returncode == 0


def test_a_start_on_a_held_port_names_the_process(registry_env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([PYTHON, "-m", "serve.cli", "run", "--port", str(port)], cwd=REPO, env=registry_env,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert f"port {port} is held by " in last and f"(kill {os.getpid()})" in last
