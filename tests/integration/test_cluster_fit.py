"""A job on a small `ray start` cluster (one node, 2 CPUs, token auth: the local rehearsal's
tooling) that cannot fit fails in seconds with the numbers and the fixes, instead of sitting at
Ray Data's "The job may hang forever unless the cluster scales up" for as long as it is left."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.test_local_cluster import clean_env, exports, raylm_cluster, run

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def two_cpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A client environment joined to a one-node cluster of 2 CPUs (`ray start --head --num-cpus 2`)."""
    base = tmp_path_factory.mktemp("two-cpus")
    env = clean_env(base)
    try:
        up = raylm_cluster("up", "--local", "--workers", "0", "--head-cpus", "2", env=env)
        assert up.returncode == 0, f"raylm cluster up failed:\n{up.stdout}\n{up.stderr}"
        yield {**env, **exports(up.stdout)}
    finally:
        raylm_cluster("down", "--grace-period", "5", env=env, timeout=120)


def _job(env: dict[str, str], storage: str, *argv: str) -> tuple[int, str, float]:
    t0 = time.time()
    out = run([sys.executable, "-m", *argv], {**env, "RAYLM_STORAGE": storage}, timeout=120)
    return out.returncode, out.stdout + out.stderr, time.time() - t0


def test_two_training_workers_that_leave_no_cpu_for_the_data_fail_at_once(two_cpus, gpt_corpus):
    rc, out, seconds = _job(two_cpus, os.environ["RAYLM_STORAGE"], "jobs.pretrain", "--config",
                            "configs/gpt-tiny.yaml", "--set", "corpus=t-gpt", "--set", "scaling.num_workers=2",
                            "--set", "name=t-fit")
    assert rc == 1 and seconds < 60, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "2 worker(s) x 1 CPU and 1 CPU for Ray Data's readers" in last and "CPU: need 3, cluster has 2" in last
    assert "--set scaling.cpus_per_worker=0.5 fits" in last and "Traceback" not in out


def test_a_sweep_whose_trial_cannot_fit_fails_at_once(two_cpus, gpt_base):
    rc, out, seconds = _job(two_cpus, os.environ["RAYLM_STORAGE"], "tune.sweep", "--config",
                            "configs/tune-topic-tiny.yaml", "--set", f"finetune.model.checkpoint={gpt_base}",
                            "--set", "trial.cpus=3", "--set", "name=t-fit-sweep")
    assert rc == 1 and seconds < 60, out[-3000:]
    assert "the 1 worker(s) x 3 CPU of one trial need more" in out and "CPU: need 3, cluster has 2" in out
    assert "Traceback" not in out
