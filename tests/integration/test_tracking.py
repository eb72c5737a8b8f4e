"""MLflow tracking on the shared local Ray: a pretraining run's metrics reach a sqlite MLflow store,
and a store MLflow refuses stops the job before it asks Ray for anything."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cluster import tracking
from jobs import pretrain as pretrain_job
from tests.conftest import PYTHON, REPO, subprocess_env

mlflow = pytest.importorskip("mlflow", reason="MLflow is the raylm[mlflow] extra: pip install -e '.[mlflow]'")

# A short run on the test corpus (as tests/integration/test_pretrain.py sets one up).
SETS = ["corpus=t-gpt", "train.batch_size=8", "train.log_every=5", "train.eval_every=10", "train.eval_batches=4",
        "train.max_steps=20", "train.checkpoint_every=20", "optim.warmup_steps=5", "scaling.threads_per_worker=1"]


def _args(name: str) -> list[str]:
    return ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), *[a for s in [f"name={name}", *SETS]
                                                                          for a in ("--set", s)]]


def _rows(name: str, split: str) -> list[dict]:
    with open(os.path.join(os.environ["RAYLM_STORAGE"], "pretrain", name, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def test_a_pretraining_runs_metrics_are_in_a_sqlite_mlflow_store(gpt_corpus, ray_session, tmp_path):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = subprocess_env(ray_session)
    env["MLFLOW_TRACKING_URI"] = uri  # the driver's check reads it here
    # ...and Ray gives the workers the job's runtime environment: how `ray job submit
    # --runtime-env-json '{"env_vars": {...}}'` hands a setting to a job's driver and every worker.
    env[RAY_JOB_CONFIG_JSON_ENV_VAR] = json.dumps({"runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": uri}}})
    proc = subprocess.run([PYTHON, "-m", "jobs.pretrain", *_args("t-mlflow")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 't-mlflow'")
    assert run.info.status == "FINISHED"
    for key, split in (("train_loss", "train"), ("val_loss", "validation")):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = [(r["step"], r[key]) for r in _rows("t-mlflow", split)]
        assert [s for s, _ in logged] == [s for s, _ in expected] and len(expected) >= 2, key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected]), key


def test_a_file_store_mlflow_refuses_stops_the_job_before_ray(gpt_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setattr("cluster.runtime.connect", lambda *a, **k: pytest.fail("the job asked Ray for something"))
    assert pretrain_job.main(_args("t-mlflow-refused")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: MLflow refused MLFLOW_TRACKING_URI=file:{tmp_path}/mlruns: ")
    assert error.endswith("; use sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true")
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "pretrain", "t-mlflow-refused"))
    assert os.listdir(tmp_path) == []
