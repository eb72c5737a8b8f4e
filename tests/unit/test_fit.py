"""Whether a job fits the cluster, decided in seconds from the cluster's resources (faked here, no
Ray): pretraining workers leave Ray Data's readers a CPU, fine-tuning's and a sweep's (whose data
are materialized before training) need none beside them, a sweep runs as many trials as fit, and on an autoscaling cluster the job waits, saying once a minute what for."""

from __future__ import annotations

import logging

import pytest

from cluster.config import load_config
from cluster.errors import JobError
from cluster.stages.pretrain import PretrainConfig
from cluster.train import launcher
from tune.config import SweepConfig
from tune.trial import concurrent_trials


@pytest.fixture()
def cluster(monkeypatch):
    """Set `cluster["CPU"]` etc.: what ray.cluster_resources() answers."""
    resources: dict[str, float] = {}
    monkeypatch.setattr("ray.cluster_resources", lambda: dict(resources))
    monkeypatch.delenv("RAYLM_WAIT_FOR_RESOURCES", raising=False)
    return resources


def scaling(*sets: str):
    return load_config(PretrainConfig, None, ["corpus=c", *sets]).scaling


def sweep(*sets: str) -> SweepConfig:
    return load_config(SweepConfig, None, ["finetune={task: classification, model: {checkpoint: x}}",
                                           "search={optim.lr: {choice: [0.001]}}", *sets])


def test_training_workers_leave_the_readers_a_cpu(cluster):
    cluster["CPU"] = 2.0  # `ray start --head --num-cpus 2`
    with pytest.raises(JobError) as refused:
        launcher.check_resources(scaling("scaling.num_workers=2"))
    message = str(refused.value)
    assert "2 worker(s) x 1 CPU and 1 CPU for Ray Data's readers" in message
    assert "CPU: need 3, cluster has 2" in message and "--set scaling.cpus_per_worker=0.5 fits" in message
    launcher.check_resources(scaling("scaling.num_workers=2", "scaling.cpus_per_worker=0.5"))
    cluster["CPU"] = 3.0  # the embedded Ray on 2 cores: one CPU more than the machine has
    launcher.check_resources(scaling("scaling.num_workers=2"))


def test_fine_tuning_workers_may_take_every_cpu(cluster):
    # Regression: fine-tuning asked for a reader's CPU its materialized data never uses, and a
    # 2-worker job on the 3-CPU embedded Ray was refused.
    cluster["CPU"] = 3.0
    launcher.check_resources(scaling("scaling.num_workers=3"), launcher.MATERIALIZED_DATA_CPUS)
    with pytest.raises(JobError) as refused:
        launcher.check_resources(scaling("scaling.num_workers=4"), launcher.MATERIALIZED_DATA_CPUS)
    assert "scaling: 4 worker(s) x 1 CPU need more" in str(refused.value) and "Ray Data" not in str(refused.value)


def test_a_sweep_runs_as_many_trials_as_fit(cluster, caplog):
    cluster["CPU"] = 1.5
    with caplog.at_level(logging.WARNING, logger="tune.trial"):
        assert concurrent_trials(sweep("max_concurrent_trials=2")) == 1
    assert "max_concurrent_trials 2 -> 1" in caplog.text
    cluster["CPU"] = 2.0
    with pytest.raises(JobError, match="the 1 worker.s. x 3 CPU of one trial need more than the cluster has "
                                       ".CPU: need 3, cluster has 2"):
        concurrent_trials(sweep("trial.cpus=3"))
    assert concurrent_trials(sweep("max_concurrent_trials=2")) == 2
    # Regression: two 1-CPU workers and the trial's driver sliver fit the 3-CPU embedded Ray.
    cluster["CPU"] = 3.0
    assert concurrent_trials(sweep("trial.workers=2", "max_concurrent_trials=2")) == 1
    cluster["CPU"] = 5.0
    assert concurrent_trials(sweep("max_concurrent_trials=4", "trial.cpus=0.5")) == 4
    with pytest.raises(JobError, match="GPU: need 1, cluster has 0"):
        concurrent_trials(sweep("trial.gpus=1"))


def test_on_an_autoscaling_cluster_the_job_waits_and_says_what_for(cluster, monkeypatch, caplog):
    from cluster import runtime

    cluster["CPU"] = 2.0
    monkeypatch.setenv("RAYLM_WAIT_FOR_RESOURCES", "1")
    naps = []

    def nap(seconds: float) -> None:  # the autoscaler adds a node after the third look
        naps.append(seconds)
        if len(naps) == 3:
            cluster["CPU"] = 4.0

    monkeypatch.setattr(runtime.time, "sleep", nap)
    with caplog.at_level(logging.WARNING, logger="cluster.runtime"):
        launcher.check_resources(scaling("scaling.num_workers=2"))
    assert len(naps) == 3
    waiting = [r for r in caplog.records if "waiting for the cluster to grow" in r.getMessage()]
    assert len(waiting) == 1 and "CPU: need 3, cluster has 2" in waiting[0].getMessage()  # once a minute
