"""Rehearse a multi-node Ray cluster on one machine before paying for a real one.

    raylm cluster up --local --workers 2 [--cpus-per-node 2]   # head + 2 worker nodes on this host
    raylm cluster status
    raylm cluster down

`up` runs `ray start --head` and one `ray start --address ...` per worker node, as a real cluster's
nodes are started, so `ray job submit`, token auth, and placement across nodes (STRICT_SPREAD puts
each Ray Train worker on a different node) behave here as they will there. Every node is a
separate raylet with its own resources and a custom resource and label (`raylm_node_<i>`,
`raylm/node=worker-<i>`) so a test can see that work really spread. What it cannot rehearse:
storage, since all nodes share this machine's disk (a real cluster needs a URI or network volume).

Each `ray start` runs in its own Unix session, and the state file records those session ids:
`down` stops exactly the processes of this cluster (raylets, GCS, dashboard, and every worker the
raylets forked since) and leaves any other Ray on the machine alone, which `ray stop` would not.
Token authentication stays on: the nodes get RAY_AUTH_MODE=token and the token's location, and
`up` prints what a client shell needs to reach the cluster.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from cluster.runtime import SERVE_ENV, free_ports

STATE_ENV = "RAYLM_LOCAL_CLUSTER_STATE"
DEFAULT_STATE = Path.home() / ".raylm" / "local-cluster.json"
DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"
# The dashboard (and so the Jobs API) listens on loopback only. Ray itself resolves 127.0.0.1 to the
# host's IP for GCS and raylets, which listen on all interfaces: token authentication is what keeps
# the network out of those.
HOST = "127.0.0.1"
START_TIMEOUT_S = 120
NODES_TIMEOUT_S = 60


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

    def ports(self) -> set[int]:
        dashboard_port = int(self.dashboard_url.rsplit(":", 1)[1])
        return {int(self.gcs_address.rsplit(":", 1)[1]), dashboard_port, self.client_server_port}

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


def _proc_name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def stop_processes(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """SIGTERM, wait, SIGKILL what is left, in `ray stop`'s order: raylets first (so their agents
    and workers exit with them instead of complaining), the GCS last (so nothing outlives it and
    fails over to reconnect attempts). Returns processes that survived SIGKILL."""
    raylets = [p for p in procs if _proc_name(p) == "raylet"]
    gcs = [p for p in procs if _proc_name(p) == "gcs_server"]
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


# ---------------------------------------------------------------------------- helpers


def ray_cli() -> str:
    """The `ray` next to this interpreter, so nodes run the same Ray as the client."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is not installed next to this Python nor on PATH")
    return found


def token_file(environ: Mapping[str, str] = os.environ) -> Path:
    """The token file Ray's loader reads when RAY_AUTH_TOKEN is unset: RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token."""
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN).expanduser()


def ensure_token() -> tuple[dict[str, str], str]:
    """Token auth env for the nodes and a description of where the token lives (never the token).

    RAY_AUTH_TOKEN in the environment wins, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (the
    order Ray's token loader uses). A missing token file is created the way
    `ray get-auth-token --generate` does: 256 random bits as hex, readable by the owner only.
    """
    env = {"RAY_AUTH_MODE": "token"}
    if os.environ.get("RAY_AUTH_TOKEN"):
        return env, "RAY_AUTH_TOKEN (from the environment)"
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = token_file()
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if explicit:
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return env, str(path)


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


def print_env(state: ClusterState) -> None:
    for key, value in state.client_env().items():
        print(f"export {key}={value}")


# ---------------------------------------------------------------------------- commands


def up(opts: argparse.Namespace) -> int:
    path = state_path(opts.state_file)
    existing = load_state(path)
    if existing is not None:
        if any(session_processes(n, existing.started_at) for n in existing.nodes):
            print(
                f"raylm cluster: a local cluster is already running (state: {path}); "
                "`raylm cluster down` first",
                file=sys.stderr,
            )
            return 1
        path.unlink()  # stale: its processes are gone (reboot, manual kill)

    auth_env, token_source = ensure_token()
    gcs_port, dashboard_port, client_port = free_ports(3)
    # Short path under /tmp: Ray's Unix sockets live inside it and socket paths max out at ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="raylm-cluster-", dir="/tmp")
    state = ClusterState(
        started_at=time.time(),
        temp_dir=temp_dir,
        gcs_address=f"{HOST}:{gcs_port}",
        dashboard_url=f"http://{HOST}:{dashboard_port}",
        client_server_port=client_port,
        auth_env=auth_env,
        token_source=token_source,
    )
    env = node_env(auth_env)
    object_store = str(opts.object_store_mb * 1024 * 1024)
    record = functools.partial(save_state, path, state)
    try:
        print(f"starting head on {state.gcs_address} (temp dir {temp_dir})", file=sys.stderr)
        head_options = {
            "--head": True,
            "--port": gcs_port,
            "--dashboard-host": HOST,
            "--dashboard-port": dashboard_port,
            "--ray-client-server-port": client_port,
            "--object-store-memory": object_store,
        }
        head = start_node("head", opts.head_cpus, {"raylm_head": 1}, head_options, env, state, record)
        state.dashboard_url = dashboard_url_from_log(head.log, state.dashboard_url)
        for i in range(1, opts.workers + 1):
            print(f"starting worker-{i} ({opts.cpus_per_node} CPUs)", file=sys.stderr)
            worker_options = {
                "--address": state.gcs_address,
                "--object-store-memory": object_store,
                # One log monitor per host is enough: the head's already tails the shared session dir.
                "--include-log-monitor": "false",
            }
            name, resources = f"worker-{i}", {f"raylm_node_{i}": 1.0}
            start_node(name, opts.cpus_per_node, resources, worker_options, env, state, record)
        wait_for_nodes(state, expected=1 + opts.workers)
    except (RuntimeError, OSError, KeyboardInterrupt) as exc:
        print(f"raylm cluster: {exc or type(exc).__name__}\nstopping what was started", file=sys.stderr)
        if not teardown(state, grace_s=5, keep_logs=True):
            path.unlink(missing_ok=True)
        print(f"logs kept in {temp_dir}", file=sys.stderr)
        return 1
    for node in state.nodes:
        node.pids = sorted(p.pid for p in session_processes(node, state.started_at))
    save_state(path, state)

    print(f"local cluster up: head + {opts.workers} worker node(s); state in {path}", file=sys.stderr)
    print(f"dashboard: {state.dashboard_url}   token: {token_source}", file=sys.stderr)
    print(
        "submit:    ray job submit --working-dir . -- python -m jobs.pretrain --config configs/gpt-tiny.yaml",
        file=sys.stderr,
    )
    print("stop:      raylm cluster down", file=sys.stderr)
    # stdout carries only the client environment, so `eval "$(raylm cluster up --local)"` works.
    print_env(state)
    return 0


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


def down(opts: argparse.Namespace) -> int:
    path = state_path(opts.state_file)
    state = load_state(path)
    if state is None:
        print(f"raylm cluster: no local cluster recorded at {path}", file=sys.stderr)
        return 0
    survivors = teardown(state, opts.grace_period, opts.keep_logs)
    if survivors:
        print(
            "raylm cluster: could not stop pids "
            + ", ".join(str(p.pid) for p in survivors)
            + f"; state kept at {path}",
            file=sys.stderr,
        )
        return 1
    path.unlink(missing_ok=True)
    kept = f"; logs kept in {state.temp_dir}" if opts.keep_logs else ""
    print(f"local cluster stopped ({len(state.nodes)} node(s)){kept}", file=sys.stderr)
    return 0


def status(opts: argparse.Namespace) -> int:
    path = state_path(opts.state_file)
    state = load_state(path)
    if state is None:
        print(f"no local cluster recorded at {path}")
        return 1
    healthy = True
    for node in state.nodes:
        procs = session_processes(node, state.started_at)
        raylet = any(_proc_name(p) == "raylet" for p in procs)
        healthy &= raylet
        print(
            f"{node.name:<10} {'up' if raylet else 'DOWN':<5} cpus={node.num_cpus} "
            f"resources={json.dumps(node.resources)} processes={len(procs)}"
        )
    print(f"gcs {state.gcs_address}  dashboard {state.dashboard_url}  token {state.token_source}")
    if healthy:
        count = alive_node_count(state)
        print(f"cluster reports {count} alive node(s)")
        healthy = count == len(state.nodes)
    print_env(state)
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-file", help=f"where the cluster is recorded (env {STATE_ENV}; default {DEFAULT_STATE})"
    )
    p = argparse.ArgumentParser(prog="raylm cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    u = sub.add_parser("up", parents=[common], help="start a head and worker nodes on this machine")
    u.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="on this machine (real clusters: `ray up cluster.yaml` or KubeRay, see cluster/ops)",
    )
    u.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    # Logical CPUs, not cores: Ray only counts them for scheduling. A 2-core laptop can declare 2 per
    # node so that a 1-CPU training worker and a Ray Data task both fit on every node; they share
    # the real cores, which is slow but exercises the same placement as a real cluster.
    u.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each worker node offers")
    # 0 as on a real cluster, where the head only coordinates: drivers and Train controllers need no
    # CPU, so training and data tasks must land on worker nodes.
    u.add_argument("--head-cpus", type=int, default=0, help="logical CPUs on the head node")
    u.add_argument("--object-store-mb", type=int, default=512, help="object store per node (MiB)")
    u.set_defaults(func=up)

    d = sub.add_parser("down", parents=[common], help="stop exactly the processes `up` started")
    d.add_argument("--grace-period", type=float, default=10, help="seconds between SIGTERM and SIGKILL")
    d.add_argument("--keep-logs", action="store_true", help="keep the cluster's temp dir (Ray logs)")
    d.set_defaults(func=down)

    s = sub.add_parser("status", parents=[common], help="which nodes are up; the client environment")
    s.set_defaults(func=status)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(opts, "workers", 1) < 0:
        print("raylm cluster: --workers must be >= 0", file=sys.stderr)
        return 2
    return int(opts.func(opts))


if __name__ == "__main__":
    sys.exit(main())
