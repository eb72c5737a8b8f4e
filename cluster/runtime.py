"""Where Ray runs: join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start
an embedded local Ray sized to this machine with its dashboard on 127.0.0.1 only.

This is the one place raylm calls `ray.init`; entry points call `connect()`, the core never does.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


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

