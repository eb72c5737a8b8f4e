"""The run directory contract: `<storage>/<job>/<run-name>/` with config.yaml, metrics.jsonl and
summary.json written last. No summary.json means the run did not finish."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pyarrow.fs as pafs

from cluster import storage
from cluster.config import Section
from cluster.objectives.metrics import DEFAULT_METRIC, METRICS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, key: str = "name") -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(
            f"config key '{key}': '{name}' is not a valid run name "
            "(letters, digits, '.', '_', '-'; at most 128 characters)"
        )
    return name


class RunDir:
    """One run's directory. Local paths append metrics as they come; URIs buffer and rewrite."""

    def __init__(self, job: str, name: str, root: str | None = None):
        self.job = job
        self.name = check_name(name)
        self.job_dir = storage.join(root or storage_root(), job)
        self.path = storage.join(self.job_dir, self.name)

    @property
    def summary_path(self) -> str:
        return storage.join(self.path, "summary.json")

    def file(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def begin(self, config: Section, *stale: str) -> RunDir:
        """Start (or restart) the run: make its folder, remove summary.json and the `stale` files or
        folders named (what says an earlier attempt finished), then write the resolved config. From
        here until the new summary the run is unfinished. A storage that cannot be written fails
        here with one message naming the folder, before any work."""
        from cluster.errors import JobError

        try:
            storage.makedirs(self.path)
            for name in ("summary.json", *stale):
                fs, path = storage.filesystem(self.file(name))
                kind = fs.get_file_info(path).type
                if kind == pafs.FileType.Directory:
                    fs.delete_dir(path)
                elif kind != pafs.FileType.NotFound:
                    fs.delete_file(path)
            self.write_config(config)
        except OSError as exc:
            raise JobError(f"storage '{self.path}' is not writable: {exc}") from None
        return self

    def check_writable(self) -> RunDir:
        """Fail at once, with `begin`'s message, when the run's storage cannot be written. Jobs whose
        setup takes a while before `begin` (fine-tuning and sweeps start Ray, then read and tokenize
        their data: ~10 s on 2 cores) call it after their input checks, before that setup. It writes
        and removes one probe file in the job's folder (`<storage>/<job>/`): bad input found later
        still leaves no run folder, and an earlier run's files are not touched."""
        from cluster.errors import JobError

        probe = storage.join(self.job_dir, f".write-check-{uuid.uuid4().hex[:12]}")
        try:
            storage.makedirs(self.job_dir)
            storage.write_bytes_atomic(probe, b"")
            fs, path = storage.filesystem(probe)
            fs.delete_file(path)
        except OSError as exc:
            raise JobError(f"storage '{self.path}' is not writable: {exc}") from None
        return self

    def write_config(self, config: Section) -> None:
        storage.write_text_atomic(self.file("config.yaml"), config.to_yaml())

    def write_summary(self, summary: dict[str, Any]) -> str:
        summary = {"job": self.job, "name": self.name, "run_dir": self.path, **summary}
        storage.write_json_atomic(self.summary_path, summary)
        return self.summary_path


def storage_root() -> str:
    return storage.storage_root()


def run_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a finished run stands for: its best (else its final) one, from summary.json;
    None when `run_dir` holds no summary (not a run, or one that did not finish)."""
    summary = storage.join(run_dir, "summary.json")
    if not storage.exists(summary):
        return None
    s = storage.read_json(summary)
    return (s.get("best") or {}).get("checkpoint") or (s.get("final") or {}).get("checkpoint")


def run_metric(run_dir: str) -> dict[str, Any] | None:
    """The metric of the checkpoint run_checkpoint picks, as the registry records it ({name, value,
    mode}): a sweep's objective; a fine-tuning run's task metric (the one a sweep optimises by
    default), else its val_loss; a pretraining run's val_loss. None when the summary has no value."""
    summary = storage.join(run_dir, "summary.json")
    if not storage.exists(summary):
        return None
    s = storage.read_json(summary)
    best = s.get("best") or {}
    if s.get("metric") and s.get("mode") in ("max", "min"):  # a sweep: best holds its objective
        value = best.get(s["metric"])
        return {"name": s["metric"], "value": float(value), "mode": s["mode"]} if _number(value) else None
    metrics = (best if best.get("checkpoint") else s.get("final") or {}).get("metrics") or {}
    task = s.get("task")
    name = DEFAULT_METRIC[task] if _number(metrics.get(DEFAULT_METRIC.get(task, ""))) else "val_loss"
    if not _number(metrics.get(name)):
        return None
    return {"name": name, "value": float(metrics[name]), "mode": METRICS.get(task, {}).get(name, "min")}


# The jobs whose finished runs stand for a checkpoint, in the order a bare name is looked up.
CHECKPOINT_JOBS = ("finetune", "tune", "distill", "prune", "pretrain")


class RunLookupError(ValueError):
    """A run name that names several runs, or a run that has not finished."""


def named_run(name: str, root: str | None = None) -> str | None:
    """The folder of the finished fine-tuning run, sweep, distillation or pretraining run called `name` under the
    storage root; None when there is no run of that name."""
    runs = [storage.join(root or storage_root(), job, name) for job in CHECKPOINT_JOBS]
    found = [r for r in runs if storage.exists(storage.join(r, "summary.json"))]
    if len(found) > 1:
        raise RunLookupError(f"'{name}' names {len(found)} runs ({' and '.join(found)}); give the run's folder")
    if found:
        return found[0]
    unfinished = [r for r in runs if storage.exists(r)]
    if unfinished:
        raise RunLookupError(f"run '{unfinished[0]}' has no summary.json: it has not finished")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def is_run_dir(path: str) -> bool:
    """A run directory (summary.json) rather than a checkpoint (config.json) or anything else."""
    return storage.exists(storage.join(path, "summary.json")) and not storage.exists(storage.join(path, "config.json"))
