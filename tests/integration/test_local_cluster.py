"""The local multi-node rehearsal: `raylm cluster up --local` gives a head and two worker nodes with
token auth on, `ray job submit` runs raylm's jobs across them exactly as on a real cluster, and
`raylm cluster down` leaves no process behind.

Everything talks to the cluster the way a user does: the `raylm` and `ray` commands in
subprocesses, with the environment `up` prints. Deselect with `-m "not multinode"`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.multinode

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
# Typical: 15 s for a probe, 30 s to prepare, 90 s to pretrain on an idle 2-core machine. The margin
# is for shared CI machines; a job past it is stopped and the test fails with its log tail.
JOB_TIMEOUT_S = 240
# A smaller synthetic corpus than configs/prepare-synthetic.yaml's so the whole module stays within
# about three minutes on two cores; still enough rows for two workers' first steps.
PREPARE_SETS = ["sources=[{kind: synthetic, num_docs: 4000, seed: 0}]", "tokenizer.train_docs=1000"]


@dataclass
class LocalCluster:
    env: dict[str, str]  # a client shell after `eval "$(raylm cluster up ...)"`
    state_file: Path
    state: dict
    storage: Path


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def raylm_cluster(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "jobs.cli", "cluster", *args], env, timeout)


def clean_env(base: Path) -> dict[str, str]:
    """This process's environment minus any Ray client settings, with a token of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAYLM_LOCAL_CLUSTER_STATE"] = str(base / "local-cluster.json")
    env["RAY_AUTH_TOKEN_PATH"] = str(base / "auth_token")  # `up` creates it
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def exports(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", stdout, flags=re.MULTILINE))


def session_processes(state: dict) -> list[psutil.Process]:
    sessions = {node["session_id"] for node in state["nodes"]}
    alive = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if (
                proc.info["status"] == psutil.STATUS_ZOMBIE
                or proc.info["create_time"] < state["started_at"] - 1
            ):
                continue
            if os.getsid(proc.pid) in sessions:
                alive.append(proc)
        except (OSError, psutil.Error):
            continue
    return alive


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = tmp_path_factory.mktemp("multinode")
    env = clean_env(base)
    state_file = Path(env["RAYLM_LOCAL_CLUSTER_STATE"])
    try:
        up = raylm_cluster("up", "--local", "--workers", str(WORKERS), "--cpus-per-node", "2", env=env)
        assert up.returncode == 0, f"raylm cluster up failed:\n{up.stdout}\n{up.stderr}"
        client = {**env, **exports(up.stdout)}
        assert client.get("RAY_AUTH_MODE") == "token", up.stdout
        state = json.loads(state_file.read_text())
        yield LocalCluster(env=client, state_file=state_file, state=state, storage=base / "storage")
    finally:
        # Also when `up` failed halfway or a test was interrupted; a no-op after the down test.
        raylm_cluster("down", "--grace-period", "5", env=env, timeout=120)


def submit(
    cluster: LocalCluster, entrypoint: list[str], name: str
) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` and wait; the submission id lets `ray job status` find it afterwards."""
    submission_id = f"{name}-{uuid.uuid4().hex[:8]}"
    runtime_env = json.dumps({"env_vars": {"RAYLM_STORAGE": str(cluster.storage)}})
    cmd = [
        ray_cli(), "job", "submit", "--address", cluster.env["RAY_API_SERVER_ADDRESS"],
        "--submission-id", submission_id, "--working-dir", ".", "--runtime-env-json", runtime_env,
        "--", *entrypoint,
    ]  # fmt: skip
    try:
        result = run(cmd, cluster.env, JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logs = run([ray_cli(), "job", "logs", submission_id], cluster.env, 60).stdout
        run([ray_cli(), "job", "stop", submission_id], cluster.env, 60)
        pytest.fail(f"job {submission_id} still running after {JOB_TIMEOUT_S}s; log tail:\n{logs[-4000:]}")
    return submission_id, result


def job_status(cluster: LocalCluster, submission_id: str) -> str:
    """The status `ray job status` reports, from the sentences it prints for each state."""
    out = run([ray_cli(), "job", "status", "--log-style", "record", submission_id], cluster.env, 60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    terminal = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    if terminal:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[terminal.group(1)]
    other = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
    return other.group(1) if other else f"unknown: {text}"


def test_head_and_two_workers_are_alive(cluster: LocalCluster):
    # A separate driver, as a user's script would connect with the printed RAY_ADDRESS.
    probe = (
        "import json, os, ray; ray.init(address=os.environ['RAY_ADDRESS'], log_to_driver=False); "
        "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
    )
    out = run([sys.executable, "-c", probe], cluster.env, 120)
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(nodes) == 1 + WORKERS
    assert sum(1 for n in nodes if "raylm_head" in n and n.get("CPU", 0) == 0) == 1
    for i in range(1, WORKERS + 1):
        (node,) = [n for n in nodes if f"raylm_node_{i}" in n]
        assert node["CPU"] == 2


def test_the_cluster_rejects_a_wrong_token(cluster: LocalCluster):
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}  # RAY_AUTH_TOKEN wins over the token file
    out = run([ray_cli(), "job", "list", "--address", cluster.env["RAY_API_SERVER_ADDRESS"]], env, 60)
    assert out.returncode != 0
    assert re.search(r"Forbidden|Unauthorized|authentication", out.stdout + out.stderr, re.IGNORECASE)


def test_a_submitted_job_sees_every_node(cluster: LocalCluster):
    probe = "import ray; ray.init(); print('ALIVE_NODES', sum(n['Alive'] for n in ray.nodes()))"
    submission_id, out = submit(cluster, ["python", "-c", probe], "probe")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ALIVE_NODES {1 + WORKERS}" in out.stdout
    assert job_status(cluster, submission_id) == "SUCCEEDED"


def test_pretrain_spreads_its_workers_over_two_nodes(cluster: LocalCluster):
    corpus = f"corpus-{uuid.uuid4().hex[:8]}"
    prepare = [
        "python",
        "-m",
        "jobs.prepare",
        "--config",
        "configs/prepare-synthetic.yaml",
        "--set",
        f"name={corpus}",
    ]
    for item in PREPARE_SETS:
        prepare += ["--set", item]
    submission_id, out = submit(cluster, prepare, "prepare")
    assert out.returncode == 0 and job_status(cluster, submission_id) == "SUCCEEDED", out.stdout + out.stderr

    name = f"multinode-{uuid.uuid4().hex[:8]}"
    sets = [
        f"name={name}", f"corpus={corpus}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        "scaling.placement_strategy=STRICT_SPREAD", "train.max_steps=4",
    ]  # fmt: skip
    pretrain = ["python", "-m", "jobs.pretrain", "--config", "configs/gpt-tiny.yaml"]
    for item in sets:
        pretrain += ["--set", item]
    submission_id, out = submit(cluster, pretrain, "pretrain")
    assert out.returncode == 0, out.stdout + out.stderr
    assert job_status(cluster, submission_id) == "SUCCEEDED"

    summary = json.loads((cluster.storage / "pretrain" / name / "summary.json").read_text())
    workers = summary["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, f"STRICT_SPREAD put both workers on one node: {workers}"


def test_serve_with_the_proxy_on_the_head_only_answers_and_every_proxy_is_healthy(cluster: LocalCluster):
    """Several nodes on one host cannot each bind the HTTP port: with Serve's default (a proxy on
    every node with replicas) the worker nodes' HAProxies exited with "Address already in use" and
    were restarted in a loop. `--proxy-location HeadOnly` leaves one proxy, forwarding to replicas
    on the worker nodes."""
    import httpx
    import yaml

    from cluster.runtime import free_ports
    from serve import tiny

    tiny.publish_all(str(cluster.storage / "tiny-models"), root=str(cluster.storage / "registry"))
    (port,) = free_ports(1)
    env = {**cluster.env, "RAYLM_STORAGE": str(cluster.storage)}
    cmd = [sys.executable, "-m", "serve.cli", "run", "--port", str(port), "--proxy-location", "HeadOnly",
           "--set", 'models=["bert-cls"]']
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = cluster.env["RAY_API_SERVER_ADDRESS"]
    try:
        lines = []
        for line in server.stdout:  # blocks until the app is up (or the command exits)
            lines.append(line)
            if line.startswith("raylm serving at"):
                break
        assert server.poll() is None, "".join(lines[-40:])
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "bert-cls", "inputs": "a good day"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["label"] in tiny.CLASS_LABELS
        status = run([str(Path(sys.executable).parent / "serve"), "status", "-a", address], env, 60)
        assert status.returncode == 0, status.stderr
        proxies = yaml.safe_load(status.stdout)["proxies"]
        assert list(proxies.values()) == ["HEALTHY"], status.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
        run([str(Path(sys.executable).parent / "serve"), "shutdown", "-a", address, "-y"], env, 120)


def test_serve_deploy_turns_token_auth_on_for_its_client(cluster: LocalCluster, tmp_path: Path):
    # Regression: `raylm serve deploy` handed `serve deploy` the token but not RAY_AUTH_MODE=token,
    # without which Ray's clients send no token (401), and it read ~/.ray/auth_token even when
    # RAY_AUTH_TOKEN_PATH named the cluster's. A shell after `ray start` has neither setting.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    env["RAYLM_STORAGE"] = str(tmp_path / "empty")  # no models: the ingress alone
    env["RAYLM_API_KEY"] = "drill-key"  # it listens on 0.0.0.0: an open API there is refused
    address = cluster.env["RAY_API_SERVER_ADDRESS"]
    out = run([sys.executable, "-m", "serve.cli", "deploy", "--address", address], env, 120)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Sent deploy request successfully" in out.stdout + out.stderr
    finally:
        run([str(Path(sys.executable).parent / "serve"), "shutdown", "-a", address, "-y"], cluster.env, 120)


def test_a_driver_without_token_mode_is_told_how_to_join(cluster: LocalCluster, tmp_path: Path):
    # Ray reads RAY_AUTH_MODE at import; without it, joining a token cluster failed with a bare
    # "Failed to connect to Ray cluster", as if the cluster were down, and a traceback.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    env["RAYLM_STORAGE"] = str(tmp_path)
    out = run([sys.executable, "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml",
               "--set", "sources.0.num_docs=100"], env, 180)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot join the Ray cluster at RAY_ADDRESS={cluster.env['RAY_ADDRESS']}: "), last
    assert "run with RAY_AUTH_MODE=token set" in last and "Traceback" not in out.stderr


def test_down_stops_every_process_it_started(cluster: LocalCluster):
    recorded = [pid for node in cluster.state["nodes"] for pid in node["pids"]]
    assert recorded, "the state file records no pids"
    down_started = time.time()
    down = raylm_cluster("down", env=cluster.env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not cluster.state_file.exists()
    deadline = time.monotonic() + 10
    while session_processes(cluster.state) and time.monotonic() < deadline:
        time.sleep(0.5)  # killed processes are reaped by init a moment later
    left = session_processes(cluster.state)
    assert not left, f"still running after down: {[(p.pid, p.name()) for p in left]}"
    for pid in recorded:
        try:
            proc = psutil.Process(pid)
            # Alive under a recorded pid is fine only as a new process that reused the number.
            assert proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() >= down_started, pid
        except psutil.NoSuchProcess:
            pass
