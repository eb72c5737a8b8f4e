"""What a local rehearsal cluster is made of, on disk and in the process table.

The state file records every node's `ray start` session id; the processes of a node are the live
processes in that session (raylets, GCS, dashboard, and every worker the raylets forked since).
Stopping them by session stops exactly this cluster and leaves any other Ray on the machine alone,
which `ray stop` would not.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

STATE_ENV = "RAYLM_LOCAL_CLUSTER_STATE"
DEFAULT_STATE = Path.home() / ".raylm" / "local-cluster.json"


@dataclass
class NodeRecord:
    name: str
    session_id: int  # the `ray start` process's pid; all the node's processes share this session
    num_cpus: int
    resources: dict[str, float]
    log: str
    pids: list[int] = field(default_factory=list)


@dataclass
class ClusterState:
    started_at: float
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    client_server_port: int
    auth_env: dict[str, str]
    token_source: str
    nodes: list[NodeRecord] = field(default_factory=list)

    @property
    def gcs_port(self) -> int:
        return int(self.gcs_address.rsplit(":", 1)[1])

    @property
    def dashboard_port(self) -> int:
        return int(self.dashboard_url.rsplit(":", 1)[1])

    def ports(self) -> set[int]:
        return {self.gcs_port, self.dashboard_port, self.client_server_port}

    def client_env(self) -> dict[str, str]:
        """What a shell needs for `ray job submit` (dashboard address) and `ray.init` (GCS)."""
        return {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            **self.auth_env,
        }


# ---------------------------------------------------------------------------- state file


def state_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(STATE_ENV) or DEFAULT_STATE).expanduser()


def load_state(path: Path) -> ClusterState | None:
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    nodes = [NodeRecord(**n) for n in raw.pop("nodes", [])]
    return ClusterState(**raw, nodes=nodes)


def save_state(path: Path, state: ClusterState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- processes


def session_processes(node: NodeRecord, since: float) -> list[psutil.Process]:
    """Live processes in the node's session; the start-time check guards against reused pids."""
    found = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or os.getsid(proc.pid) != node.session_id:
                continue
            if proc.info["create_time"] >= since - 1:
                found.append(proc)
        except (OSError, psutil.Error):
            continue  # exited while we looked, or not ours to inspect
    return found


def proc_name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def stop_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM, wait, SIGKILL what is left, in `ray stop`'s order: raylets first (so their agents
    and workers exit with them instead of complaining), the GCS last (so nothing outlives it and
    fails over to reconnect attempts). Returns processes that survived SIGKILL."""
    raylets = [p for p in procs if proc_name(p) == "raylet"]
    gcs = [p for p in procs if proc_name(p) == "gcs_server"]
    others = [p for p in procs if p not in raylets and p not in gcs]
    survivors: list[psutil.Process] = []
    for bucket in (raylets, others, gcs):
        for proc in bucket:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(bucket, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        survivors.extend(alive)
    return survivors


def teardown(state: ClusterState, grace_s: float, keep_logs: bool) -> list[psutil.Process]:
    """Stop every process in the recorded sessions; returns those that would not die."""
    rounds = 5
    for round_ in range(rounds + 1):
        # Rescan after each round: a `ray start` interrupted halfway may have forked since the scan.
        left = [p for node in state.nodes for p in session_processes(node, state.started_at)]
        if not left or round_ == rounds:
            break
        stop_processes(left, grace_s)
        time.sleep(1)
    if not left and not keep_logs:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return left
