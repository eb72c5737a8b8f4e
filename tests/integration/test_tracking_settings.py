"""Tracking settings checked on the driver before Ray starts (cluster.tracking), and the rank-0
sink's MLflow refusal, without Ray. MLflow is the `raylm[mlflow]` extra: the tests that talk to a
store need it; the one about a missing MLflow hides it."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from cluster import tracking
from cluster.errors import JobError
from cluster.runs import RunDir

FILE_STORE_FIX = "use sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true"


def _uri(value: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": value}


def _refusal(uri: str, run: RunDir | None = None) -> str:
    with pytest.raises(JobError) as err:
        tracking.check_tracking(run, _uri(uri))
    return str(err.value)


@pytest.fixture
def mlflow(monkeypatch):
    module = pytest.importorskip("mlflow", reason="MLflow is the raylm[mlflow] extra: pip install -e '.[mlflow]'")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return module


def test_mlflows_file_store_is_refused_with_its_message_and_the_fix(mlflow, tmp_path, monkeypatch):
    message = _refusal(f"file:{tmp_path}/mlruns")
    assert message.startswith(f"MLflow refused MLFLOW_TRACKING_URI=file:{tmp_path}/mlruns: ")
    assert "MLFLOW_ALLOW_FILE_STORE" in message.split(": ", 1)[1].rsplit(";", 1)[0]  # MLflow's own words
    assert message.endswith(FILE_STORE_FIX)
    assert _refusal(str(tmp_path / "mlruns")).endswith(FILE_STORE_FIX)  # a plain path is the same store
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the fix the message names
    tracking.check_tracking(None, _uri(f"file:{tmp_path}/mlruns"))


def test_a_sqlite_store_is_accepted_and_holds_the_experiment_a_run_logs_into(mlflow, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.check_tracking(None, _uri(uri))
    tracking.check_tracking(None, _uri(uri))  # the second job finds the experiment the first made
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.lifecycle_stage == "active"
    assert client.search_runs([experiment.experiment_id]) == []
    client.delete_experiment(experiment.experiment_id)
    message = _refusal(uri)
    assert f"the MLflow experiment '{tracking.EXPERIMENT}' that raylm logs into is deleted" in message
    assert f"mlflow experiments restore --experiment-id {experiment.experiment_id}" in message
    client.restore_experiment(experiment.experiment_id)  # the fix the message names
    tracking.check_tracking(None, _uri(uri))


def test_an_http_store_nobody_answers_is_refused_in_seconds(mlflow):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    message = _refusal(f"http://127.0.0.1:{port}")
    assert message.startswith(f"MLflow refused MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: ")
    assert "Connection refused" in message and "start the tracking server or fix the address" in message
    # A server that accepts connections and never replies: MLflow alone waits 120 s a try, 7 retries.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        message = _refusal(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert time.monotonic() - t0 < 4 * tracking.CHECK_TIMEOUT_S
    assert "timed out" in message and f"checked with a {tracking.CHECK_TIMEOUT_S} s timeout" in message
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the short timeout was the check's only


def test_mlflow_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    message = _refusal(f"sqlite:///{tmp_path}/mlflow.db")
    assert message.startswith(f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/mlflow.db is set but mlflow is not installed")
    assert "pip install 'raylm[mlflow]'" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(JobError, match=r"pip install 'raylm\[mlflow\]'"):
        tracking.start_mlflow_run("r")
    assert os.listdir(tmp_path) == []


def test_without_mlflow_settings_only_the_tensorboard_folder_is_checked(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = RunDir("pretrain", "r", str(tmp_path / "storage"))
    tracking.check_tracking(run, {})
    assert os.listdir(tmp_path) == []  # nothing written: the storage folder is not there yet
    (tmp_path / "storage").write_text("")  # a file where the storage folder would go
    with pytest.raises(JobError) as err:
        tracking.check_tracking(run, {})
    assert str(err.value) == (f"TensorBoard folder '{tmp_path}/storage/pretrain/r/tensorboard' cannot be created: "
                              f"'{tmp_path}/storage' is a file, not a folder; move it away, or pick another run "
                              "name or RAYLM_STORAGE")


def test_the_tensorboard_folder_checks_a_local_folder_only(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    assert tracking.tensorboard_problem(str(tmp_path / "tensorboard")) is None
    assert tracking.tensorboard_problem(f"file://{tmp_path}/tensorboard") is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("")
    assert "'" + str(tmp_path / "run" / "tensorboard") + "' is a file" in tracking.tensorboard_problem(
        str(tmp_path / "run" / "tensorboard"))
    assert tracking.tensorboard_problem("s3://bucket/runs/pretrain/r/tensorboard") is None  # the storage probe's


def test_both_problems_in_one_message(mlflow, tmp_path):
    (tmp_path / "pretrain").write_text("")
    message = _refusal(f"file:{tmp_path}/mlruns", RunDir("pretrain", "r", str(tmp_path)))
    assert message.startswith("MLflow refused MLFLOW_TRACKING_URI=file:")
    assert f"{FILE_STORE_FIX}; TensorBoard folder '{tmp_path}/pretrain/r/tensorboard' cannot be created" in message


def test_the_sink_fails_with_the_drivers_message_when_mlflow_refuses_at_the_worker(mlflow, tmp_path, monkeypatch):
    from cluster.train.sink import MetricsSink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    with pytest.raises(JobError) as err:
        MetricsSink(str(tmp_path / "run"), "r", enabled=True)
    assert str(err.value) == _refusal(f"file:{tmp_path}/mlruns")
    MetricsSink(str(tmp_path / "other"), "r", enabled=False)  # other ranks never open the store
