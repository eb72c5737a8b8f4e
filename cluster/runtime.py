"""Where Ray runs: join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start
an embedded local Ray sized to this machine with its dashboard on 127.0.0.1 only.

This is the one place raylm calls `ray.init`; entry points call `connect()`, the core never does.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray Serve's throughput-optimised mode (Ray docs: "Enable High Throughput on Ray Serve", 2.56+).
# The Serve controller, proxies and replicas read it from their environment when they start, so it
# is set on the cluster, not per app: gRPC instead of Ray actor calls between the proxy and the
# deployments, user code and routers on each replica's main event loop (raylm's model calls run in
# worker threads), buffered request logs. Its direct ingress (every ingress replica on a port of
# its own, made to sit behind HAProxy) stays off, so clients keep Serve's one HTTP port.
# bench.serve at concurrency 32: generation +20-30% requests/s, classification +10-15%.
# The embedded Ray sets these unless the environment does; cluster.yaml, the KubeRay manifests
# and cluster/ops/local.py set them on every node (tests/unit/test_cluster_configs.py checks).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def connect(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Connect once per process and return the cluster's resources."""
    if not ray.is_initialized():
        # Workers must import raylm's packages; `ray job submit --working-dir` ships them, and the
        # embedded Ray runs on this machine where the project is installed.
        kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING if quiet else logging.INFO}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            for key, value in SERVE_ENV.items():  # the local raylet and every worker inherit them
                os.environ.setdefault(key, value)
            ray.init(
                num_cpus=num_cpus or embedded_cpus(),
                dashboard_host="127.0.0.1",
                include_dashboard=os.environ.get("RAYLM_DASHBOARD", "1") != "0",
                **kwargs,
            )
    return ray.cluster_resources()


def embedded_cpus() -> int:
    """Logical CPUs for the embedded Ray: the machine's cores plus one. Training workers reserve
    whole CPUs; without the extra slot a worker per core would leave Ray Data's read tasks
    unschedulable and the run would wait forever. Override with RAYLM_NUM_CPUS."""
    return int(os.environ.get("RAYLM_NUM_CPUS", (os.cpu_count() or 1) + 1))

