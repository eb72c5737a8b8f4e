"""Rehearse a multi-node Ray cluster on one machine before paying for a real one.

    raylm cluster up --local --workers 2 [--cpus-per-node 2]   # head + 2 worker nodes on this host
    raylm cluster status
    raylm cluster down

`up` runs `ray start --head` and one `ray start --address ...` per worker node, as a real cluster's
nodes are started, so `ray job submit`, token auth, and placement across nodes (STRICT_SPREAD puts
each Ray Train worker on a different node) behave here as they will there. What it cannot
rehearse: storage, since all nodes share this machine's disk (a real cluster needs a URI or network
volume). Starting nodes is in `local_nodes`; the state file and stopping a node's processes by
Unix session, so that `down` leaves any other Ray on the machine alone, in `local_state`.

Token authentication stays on: the nodes get RAY_AUTH_MODE=token and the token's location, and
`up` prints what a client shell needs to reach the cluster.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cluster.ops.local_nodes import (
    HOST,
    alive_node_count,
    dashboard_url_from_log,
    node_env,
    start_node,
    wait_for_nodes,
)
from cluster.ops.local_state import (
    DEFAULT_STATE,
    STATE_ENV,
    ClusterState,
    load_state,
    proc_name,
    save_state,
    session_processes,
    state_path,
    teardown,
)
from cluster.runtime import free_ports

DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"


# ---------------------------------------------------------------------------- token


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


# ---------------------------------------------------------------------------- up


def up(opts: argparse.Namespace) -> int:
    path = state_path(opts.state_file)
    if running_cluster(path):
        print(
            f"raylm cluster: a local cluster is already running (state: {path}); `raylm cluster down` first",
            file=sys.stderr,
        )
        return 1
    state = new_state()
    try:
        start_nodes(state, opts, record=functools.partial(save_state, path, state))
    except (RuntimeError, OSError, KeyboardInterrupt) as exc:
        abandon(state, path, exc)
        return 1
    for node in state.nodes:
        node.pids = sorted(p.pid for p in session_processes(node, state.started_at))
    save_state(path, state)
    report_up(state, path, opts.workers)
    return 0


def running_cluster(path: Path) -> bool:
    """Whether the state file records a cluster that still has processes. A stale file (its
    processes gone: reboot, manual kill) is removed."""
    existing = load_state(path)
    if existing is None:
        return False
    if any(session_processes(n, existing.started_at) for n in existing.nodes):
        return True
    path.unlink()
    return False


def new_state() -> ClusterState:
    """A cluster not started yet: the token, free ports for the head, a fresh temp dir."""
    auth_env, token_source = ensure_token()
    gcs_port, dashboard_port, client_port = free_ports(3)
    # Short path under /tmp: Ray's Unix sockets live inside it and socket paths max out at ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="raylm-cluster-", dir="/tmp")
    return ClusterState(
        started_at=time.time(),
        temp_dir=temp_dir,
        gcs_address=f"{HOST}:{gcs_port}",
        dashboard_url=f"http://{HOST}:{dashboard_port}",
        client_server_port=client_port,
        auth_env=auth_env,
        token_source=token_source,
    )


def start_nodes(state: ClusterState, opts: argparse.Namespace, record: Callable[[], None]) -> None:
    """The head, then each worker node, then wait until the cluster reports them all alive."""
    env = node_env(state.auth_env)
    object_store = str(opts.object_store_mb * 1024 * 1024)
    print(f"starting head on {state.gcs_address} (temp dir {state.temp_dir})", file=sys.stderr)
    head_options = {
        "--head": True,
        "--port": state.gcs_port,
        "--dashboard-host": HOST,
        "--dashboard-port": state.dashboard_port,
        "--ray-client-server-port": state.client_server_port,
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


def abandon(state: ClusterState, path: Path, exc: BaseException) -> None:
    """Stop what a failed `up` started; the state file stays only while some process survives."""
    print(f"raylm cluster: {exc or type(exc).__name__}\nstopping what was started", file=sys.stderr)
    if not teardown(state, grace_s=5, keep_logs=True):
        path.unlink(missing_ok=True)
    print(f"logs kept in {state.temp_dir}", file=sys.stderr)


def report_up(state: ClusterState, path: Path, workers: int) -> None:
    print(f"local cluster up: head + {workers} worker node(s); state in {path}", file=sys.stderr)
    print(f"dashboard: {state.dashboard_url}   token: {state.token_source}", file=sys.stderr)
    print(
        "submit:    ray job submit --working-dir . -- python -m jobs.pretrain --config configs/gpt-tiny.yaml",
        file=sys.stderr,
    )
    print("stop:      raylm cluster down", file=sys.stderr)
    # stdout carries only the client environment, so `eval "$(raylm cluster up --local)"` works.
    print_env(state)


def print_env(state: ClusterState) -> None:
    for key, value in state.client_env().items():
        print(f"export {key}={value}")


# ---------------------------------------------------------------------------- down, status, CLI


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
        raylet = any(proc_name(p) == "raylet" for p in procs)
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
