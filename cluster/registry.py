"""The model registry: `<RAYLM_STORAGE>/registry/<name>/` holds one published model.

Each entry is a Hugging Face directory (model.safetensors, config.json, tokenizer files) plus
`model.json` (name, task, labels, metric, config, source checkpoint, sweep id, created), which
the Serve app reads to decide how to serve it. Publishing is atomic: the entry is copied to a
temporary sibling and renamed over the old one (on object stores model.json is written last, so
an entry without model.json is incomplete). A newer publish replaces an entry only when its
metric is better, unless forced.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import shutil
import uuid
from typing import Any

import pyarrow.fs as pafs

from cluster import storage
from cluster.runs import check_name

TASKS = ("generation", "fill-mask", "classification", "tagging")
# task -> architecture name suffixes that can serve it (config.json "architectures").
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "generation": ("ForCausalLM", "LMHeadModel"),
    "fill-mask": ("ForMaskedLM", "ForPreTraining"),
    "classification": ("ForSequenceClassification",),
    "tagging": ("ForTokenClassification",),
}
# Files worth publishing; pickled weights (*.bin, *.pt, *.pkl) are never read or copied.
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SKIP_DIRS = ("train_state",)  # cluster.train.checkpoint.STATE_DIR: optimizer state and the training config


class RegistryError(ValueError):
    """A publish or lookup that cannot go ahead; the message names the checkpoint or model."""


def registry_root(root: str | None = None) -> str:
    return root or storage.join(storage.storage_root(), "registry")


def entry_path(name: str, root: str | None = None) -> str:
    return storage.join(registry_root(root), check_name(name))


def _metric_is_better(new: dict | None, old: dict | None) -> bool:
    if old is None or old.get("value") is None:
        return True
    if new is None or new.get("value") is None:
        return False
    if new.get("name") != old.get("name"):
        raise RegistryError(
            f"cannot compare metric '{new.get('name')}' with the published model's '{old.get('name')}'; "
            "use force=True (--force) to replace it"
        )
    mode = old.get("mode", new.get("mode", "max"))
    return new["value"] > old["value"] if mode == "max" else new["value"] < old["value"]


def _check_metric(metric: dict | None) -> dict | None:
    if metric is None:
        return None
    problems = [k for k in ("name", "value") if k not in metric]
    mode = metric.get("mode", "max")
    if mode not in ("max", "min"):
        problems.append("mode (must be 'max' or 'min')")
    if problems:
        raise RegistryError(f"metric {metric!r} is missing or has a bad {', '.join(problems)}")
    return {"name": str(metric["name"]), "value": float(metric["value"]), "mode": mode}


def tasks_for(architectures: list[str]) -> list[str]:
    """The tasks a checkpoint with these config.json `architectures` can serve, in TASKS order."""
    return [t for t in TASKS if any(a.endswith(w) for a in architectures for w in ARCHITECTURES[t])]


def validate_checkpoint(checkpoint: str, task: str | None) -> tuple[str, dict[str, Any]]:
    """Check the checkpoint can be published for `task` (None: the one task its architecture
    serves); returns the task and the checkpoint's config.json."""
    if task is not None and task not in TASKS:
        raise RegistryError(f"task '{task}' is not one of {', '.join(TASKS)}")
    if not storage.exists(checkpoint):
        raise RegistryError(f"checkpoint '{checkpoint}' does not exist")
    if not storage.exists(storage.join(checkpoint, "model.safetensors")):
        raise RegistryError(
            f"checkpoint '{checkpoint}' has no model.safetensors (pickled *.bin weights are never published)"
        )
    config_path = storage.join(checkpoint, "config.json")
    if not storage.exists(config_path):
        raise RegistryError(f"checkpoint '{checkpoint}' has no config.json")
    config = storage.read_json(config_path)
    archs = config.get("architectures") or []
    served = tasks_for(archs)
    if task is None:
        if len(served) != 1:
            raise RegistryError(
                f"cannot tell which task checkpoint '{checkpoint}' serves from its architecture "
                f"{archs or 'unknown'}; name it (--task {'|'.join(TASKS)})"
            )
        task = served[0]
    if task not in served:
        wanted = ARCHITECTURES[task]
        raise RegistryError(
            f"checkpoint '{checkpoint}' has architecture {archs or 'unknown'}, which cannot serve task "
            f"'{task}' (needs *{' or *'.join(wanted)})"
        )
    if not storage.exists(storage.join(checkpoint, "tokenizer.json")) and not storage.exists(
        storage.join(checkpoint, "tokenizer_config.json")
    ):
        raise RegistryError(f"checkpoint '{checkpoint}' has no tokenizer files beside the model")
    return task, config


WEIGHTS = "model.safetensors"


def weights_sha256(path: str) -> str:
    """sha256 of a model directory's model.safetensors, streamed (recorded in model.json at publish)."""
    import hashlib

    digest = hashlib.sha256()
    fs, p = storage.filesystem(storage.join(path, WEIGHTS))
    with fs.open_input_stream(p) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights(path: str, expected_sha256: str | None = None, what: str | None = None) -> None:
    """Refuse a model directory whose model.safetensors is missing, truncated or malformed (the
    safetensors header must parse and cover the file), or, given the digest recorded at publish,
    differs from what was published (a flipped bit anywhere)."""
    what = what or f"'{path}'"
    weights = storage.join(path, WEIGHTS)
    if not storage.exists(weights):
        raise RegistryError(f"{what} has no {WEIGHTS} (pickled *.bin weights are never loaded)")
    if not storage.is_uri(weights):
        from safetensors import safe_open

        try:
            with safe_open(weights, "np") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for every malformation
            raise RegistryError(f"{what}: {WEIGHTS} is corrupted ({type(exc).__name__}: {exc})") from None
    if expected_sha256 and weights_sha256(path) != expected_sha256:
        raise RegistryError(f"{what}: {WEIGHTS} does not match the sha256 recorded when it was published "
                            "(corrupted or replaced since); publish it again")


def labels_from_config(config: dict[str, Any]) -> list[str] | None:
    """config.json's id2label as a list in id order, or None when it has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    return [id2label[k] for k in sorted(id2label, key=int)]


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under `src` except pickled weights and training state, across filesystems."""
    src_fs, src_p = storage.filesystem(src)
    dst_fs, dst_p = storage.filesystem(dst)
    dst_fs.create_dir(dst_p, recursive=True)
    for info in src_fs.get_file_info(pafs.FileSelector(src_p, recursive=True)):
        rel = posixpath.relpath(info.path.replace(os.sep, "/"), src_p.replace(os.sep, "/"))
        if rel.split("/")[0] in _SKIP_DIRS or rel.endswith(_SKIP_SUFFIXES) or rel == "model.json":
            continue
        target = posixpath.join(dst_p, rel) if storage.is_uri(dst) else os.path.join(dst_p, rel)
        if info.type == pafs.FileType.Directory:
            dst_fs.create_dir(target, recursive=True)
        elif info.type == pafs.FileType.File:
            pafs.copy_files(info.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)


def checkpoint_config(checkpoint: str) -> dict[str, Any] | None:
    """The training config a raylm checkpoint saved beside its weights (train_state/config.json):
    the values in effect when it was written, which under PBT are not the trial's first ones. None
    for a checkpoint raylm did not write, or one whose config is not a JSON object."""
    path = storage.join(checkpoint, _SKIP_DIRS[0], "config.json")
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def publish(
    checkpoint: str,
    name: str,
    task: str | None,
    metric: dict | None = None,
    labels: list[str] | None = None,
    config: dict | None = None,
    sweep_id: str | None = None,
    force: bool = False,
    root: str | None = None,
) -> str:
    """Publish `checkpoint` as registry model `name` for `task` (None: the one task the checkpoint's
    architecture serves); returns the entry's path. `config` defaults to the one the checkpoint
    was trained with, when raylm wrote it."""
    check_name(name, key="name")
    task, model_config = validate_checkpoint(checkpoint, task)
    check_weights(checkpoint, what=f"checkpoint '{checkpoint}'")
    metric = _check_metric(metric)
    dest = entry_path(name, root)
    old = _read_entry(dest)
    if old is not None and not force and not _metric_is_better(metric, old.get("metric")):
        raise RegistryError(
            f"registry model '{name}' already has {old.get('metric')}; the new metric {metric} is not better. "
            "Use force=True (--force) to replace it"
        )
    if task in ("classification", "tagging"):
        labels = list(labels) if labels else labels_from_config(model_config)
        if not labels:
            raise RegistryError(f"checkpoint '{checkpoint}' has no id2label and no labels were given for '{task}'")
    entry = {
        "name": name,
        "task": task,
        "labels": list(labels) if labels else None,
        "metric": metric,
        "config": config if config is not None else checkpoint_config(checkpoint),
        "source_checkpoint": checkpoint,
        "sweep_id": sweep_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": weights_sha256(checkpoint),
    }
    return _install(checkpoint, dest, entry, replace=old is not None)


def _install(checkpoint: str, dest: str, entry: dict[str, Any], replace: bool) -> str:
    """Copy `checkpoint` to the entry folder `dest` with its model.json, replacing an old entry."""
    if storage.is_uri(dest):
        # Object stores have no rename: copy in place, model.json last marks the entry complete.
        if replace:
            storage.delete_dir(dest)
        copy_tree(checkpoint, dest)
        storage.write_json_atomic(storage.join(dest, "model.json"), entry)
        return dest
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        copy_tree(checkpoint, tmp)
        check_weights(tmp, entry["weights_sha256"], what=f"the copy of '{checkpoint}'")
        storage.write_json_atomic(os.path.join(tmp, "model.json"), entry)
        if os.path.exists(dest):
            # Two renames: the old entry moves aside, the new one takes its name, the old is removed.
            trash = f"{dest}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_entry(path: str) -> dict | None:
    meta = storage.join(path, "model.json")
    return storage.read_json(meta) if storage.exists(meta) else None


def load_entry(name: str, root: str | None = None) -> dict[str, Any]:
    """model.json of registry model `name`, with its `path` added."""
    path = entry_path(name, root)
    entry = _read_entry(path)
    if entry is None:
        known = ", ".join(m["name"] for m in list_models(root)) or "none"
        raise RegistryError(f"no registry model '{name}' under '{registry_root(root)}' (published: {known})")
    return {**entry, "path": path}


def list_models(root: str | None = None) -> list[dict[str, Any]]:
    """model.json of every complete entry, sorted by name (temporary folders are skipped)."""
    base = registry_root(root)
    fs, p = storage.filesystem(base)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        name = posixpath.basename(info.path.replace(os.sep, "/"))
        if info.type != pafs.FileType.Directory or ".tmp-" in name or ".old-" in name:
            continue
        path = storage.join(base, name)
        entry = _read_entry(path)
        if entry is not None:
            out.append({**entry, "path": path})
    return out


def dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=2)
