"""Experiment tracking settings, checked on a job's driver before Ray starts: the MLflow store named
by MLFLOW_TRACKING_URI (installed, accepted by MLflow, reachable) and the run's TensorBoard folder
(writable). The rank-0 worker's `MetricsSink` (cluster/train/sink.py) opens the same store with
`start_mlflow_run`; a store refused only there fails after Ray has started the run, and Ray Train
restarts the worker `max_failures` times first, a traceback each time.

The settings are read from the driver's environment. The embedded local Ray and `ray job submit
--runtime-env-json '{"env_vars": {...}}'` hand the same environment to the workers; a cluster whose
nodes set MLFLOW_TRACKING_URI themselves is checked only where the driver runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cluster import storage
from cluster.errors import JobError

if TYPE_CHECKING:
    from cluster.runs import RunDir

URI_VAR = "MLFLOW_TRACKING_URI"
EXPERIMENT = "raylm"  # every run logs into this MLflow experiment, named by its run name
# The driver's requests to an http(s) tracking server: this timeout and no retries. MLflow's own
# defaults (120 s, then 7 retries with backoff) would hold a job minutes on a server that is down;
# the workers keep them, riding out a server that restarts during a run.
CHECK_TIMEOUT_S = 5
_CHECK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def check_tracking(run: RunDir | None, environ: Mapping[str, str] | None = None) -> None:
    """Raise one JobError naming every tracking setting the workers would fail on: MLflow when
    MLFLOW_TRACKING_URI is set (creating the run's experiment if it is new, as the first run would),
    and the TensorBoard folder of `run` where it is a local path. Nothing else is written."""
    environ = os.environ if environ is None else environ
    problems = []
    uri = environ.get(URI_VAR)
    if uri:
        problems.append(mlflow_problem(uri))
    if run is not None:
        problems.append(tensorboard_problem(run.file("tensorboard")))
    problems = [p for p in problems if p]
    if problems:
        raise JobError("; ".join(problems))


def mlflow_problem(uri: str) -> str | None:
    """Why the MLflow store at `uri` cannot take this job's runs, with the fix; None when it can."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        return _not_installed(uri)
    try:
        with _env(_CHECK_HTTP_ENV if _is_http(uri) else {}):
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                client.create_experiment(EXPERIMENT)
    except Exception as exc:  # whatever the store raises (MLflow's own error, the database driver's): a refusal
        return refusal(uri, exc)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        eid = experiment.experiment_id
        return (f"{URI_VAR}={uri}: the MLflow experiment '{EXPERIMENT}' that raylm logs into is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {eid}`, with {URI_VAR} set) or remove it for good "
                f"(`mlflow gc --backend-store-uri {uri} --experiment-ids {eid}`)")
    return None


def refusal(uri: str, exc: BaseException) -> str:
    """The message for an MLflow store that refused `uri`: MLflow's words, then the fix."""
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if _is_file_store(uri):
        fix = "use sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true"
    elif _is_http(uri):
        fix = (f"start the tracking server or fix the address (checked with a {CHECK_TIMEOUT_S} s timeout); "
               f"or unset {URI_VAR}")
    else:
        fix = f"fix {URI_VAR}, or unset it (metrics.jsonl and TensorBoard still get every metric)"
    return f"MLflow refused {URI_VAR}={uri}: {detail}; {fix}"


def start_mlflow_run(run_name: str) -> Any:
    """The `mlflow` module with a run named `run_name` started in the raylm experiment, for the
    rank-0 worker's MetricsSink; a JobError with `check_tracking`'s message when MLflow refuses."""
    uri = os.environ.get(URI_VAR, "")
    try:
        import mlflow
    except ImportError:
        raise JobError(_not_installed(uri)) from None
    try:
        mlflow.set_experiment(EXPERIMENT)
        mlflow.start_run(run_name=run_name)
    except Exception as exc:  # as in mlflow_problem: any failure of the store is a refusal
        raise JobError(refusal(uri, exc)) from None
    return mlflow


def tensorboard_problem(folder: str) -> str | None:
    """Why the local folder `folder` cannot hold TensorBoard's event files, with the fix; None when it
    can, or when it is on an object store (the storage check, RunDir.check_writable, covers those).
    It writes nothing: the folder, or the nearest of its parents that exists, is examined."""
    if storage.is_uri(folder):
        return None
    path = os.path.abspath(folder.removeprefix("file://"))
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (f"TensorBoard folder '{path}' cannot be created: '{existing}' is a file, not a folder; move it "
                "away, or pick another run name or RAYLM_STORAGE")
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"TensorBoard folder '{path}' cannot be written: '{existing}' is not writable by this user; make it "
                "writable, or set RAYLM_STORAGE to a folder that is")
    return None


def _not_installed(uri: str) -> str:
    return (f"{URI_VAR}={uri} is set but mlflow is not installed here: pip install 'raylm[mlflow]', or unset "
            f"{URI_VAR} (metrics.jsonl and TensorBoard still get every metric)")


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _is_file_store(uri: str) -> bool:
    """A URI MLflow opens as its file store: `file:` or a plain path (not Databricks' scheme-less names)."""
    scheme = urlparse(uri).scheme.lower()
    return scheme == "file" or (not scheme and uri not in ("databricks", "databricks-uc", "uc"))


@contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in os.environ (where MLflow reads its HTTP settings per request), then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
