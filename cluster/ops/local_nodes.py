"""Starting the nodes of a local rehearsal cluster: one `ray start` per node, each in its own Unix
session, with its own ports, and asking the cluster how many nodes it sees.

Every node is a separate raylet with its own resources and a custom resource and label
(`raylm_node_<i>`, `raylm/node=worker-<i>`), so a test can see that work really spread. The nodes
share one host, so every port a node listens on is chosen here rather than left to Ray's defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster.ops.local_state import ClusterState, NodeRecord
from cluster.runtime import SERVE_ENV, free_ports

# The dashboard (and so the Jobs API) listens on loopback only. Ray itself resolves 127.0.0.1 to the
# host's IP for GCS and raylets, which listen on all interfaces: token authentication is what keeps
# the network out of those.
HOST = "127.0.0.1"
START_TIMEOUT_S = 120
NODES_TIMEOUT_S = 60


def ray_cli() -> str:
    """The `ray` next to this interpreter, so nodes run the same Ray as the client."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is not installed next to this Python nor on PATH")
    return found


def node_env(auth_env: dict[str, str]) -> dict[str, str]:
    env = {**SERVE_ENV, **os.environ, **auth_env}  # Serve's throughput mode unless the shell says otherwise
    # A job's entrypoint (`python -m jobs.pretrain`) is resolved on the node's PATH: put this
    # interpreter first so jobs run with the Python that has raylm and this Ray installed.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # A client address left in the shell from an earlier rehearsal must not redirect `ray start`.
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return env


def flags(options: dict[str, object]) -> list[str]:
    """`{"--num-cpus": 2, "--head": True}` -> ["--num-cpus", "2", "--head"]."""
    out: list[str] = []
    for flag, value in options.items():
        out += [flag] if value is True else [flag, str(value)]
    return out


def agent_ports(taken: set[int]) -> dict[str, int]:
    """Explicit free ports for a node's agents. Left to Ray, every node on the host would try the
    same defaults (52365 for the dashboard agent), and a second node, or another Ray on this
    machine, would leave the head without the job agent that `ray job submit` talks to. `taken`:
    ports already promised to the head but maybe not bound yet."""
    names = (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    ports = free_ports(len(names))
    while taken & set(ports):
        ports = free_ports(len(names))
    return dict(zip(names, ports, strict=True))


def start_node(
    name: str,
    num_cpus: int,
    resources: dict[str, float],
    options: dict[str, object],
    env: dict[str, str],
    state: ClusterState,
    record: Callable[[], None],
) -> NodeRecord:
    """Run one `ray start` in a new session and wait for it to return (the node is then up).
    `record` saves the state as soon as the session exists, so `down` finds it even if this
    process dies while the node starts."""
    log = os.path.join(state.temp_dir, f"ray-start-{name}.log")
    common = {
        "--num-cpus": num_cpus,
        "--resources": json.dumps(resources),
        "--num-gpus": 0,
        "--labels": f"raylm/node={name}",
        "--temp-dir": state.temp_dir,
        "--disable-usage-stats": True,
        "--log-style": "record",
        "--log-color": "false",
    }
    cmd = [ray_cli(), "start", *flags({**options, **common, **agent_ports(state.ports())})]
    with open(log, "w") as out:
        # cwd is the cluster's temp dir: a job without --working-dir runs in the raylet's cwd, and a
        # stray `ray/` folder there (as in /tmp) would shadow the real package.
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=state.temp_dir,
            start_new_session=True,
        )
    node = NodeRecord(name=name, session_id=proc.pid, num_cpus=num_cpus, resources=resources, log=log)
    state.nodes.append(node)
    record()
    try:
        rc = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"`ray start` for {name} did not return in {START_TIMEOUT_S}s; see {log}"
        ) from None
    if rc != 0:
        raise RuntimeError(f"`ray start` for {name} failed (exit {rc}):\n{_tail(log)}")
    return node


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def alive_node_count(state: ClusterState) -> int | None:
    """ALIVE nodes as the cluster's state API reports them (through the authenticated dashboard)."""
    query = {"--address": state.dashboard_url, "--filter": "state=ALIVE", "--format": "json", "--limit": 1000}
    cmd = [ray_cli(), "list", "nodes", *flags(query)]
    env = dict(os.environ, **state.auth_env)
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    try:
        return len(json.loads(out.stdout))
    except json.JSONDecodeError:
        return None


def wait_for_nodes(state: ClusterState, expected: int) -> None:
    deadline = time.monotonic() + NODES_TIMEOUT_S
    seen: int | None = None
    while time.monotonic() < deadline:
        seen = alive_node_count(state)
        if seen == expected:
            return
        time.sleep(1)
    raise RuntimeError(f"expected {expected} alive nodes, the cluster reports {seen}")


def dashboard_url_from_log(log: str, fallback: str) -> str:
    """The dashboard may move to another port if ours was taken meanwhile; `ray start` prints it."""
    match = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", Path(log).read_text(errors="replace"))
    return match.group(1) if match else fallback
