"""The model registry: `<RAYLM_STORAGE>/registry/<name>/` holds the published versions of one model.

Each version is a Hugging Face directory (model.safetensors, config.json, tokenizer files) plus
`model.json` (name, task, labels, metric, config, source checkpoint, sweep id, created, sha256 of
the weights, version), which the Serve app reads to decide how to serve it. A publish writes a new
immutable version and then moves the pointer `registry/<name>/model.json` to it in one step, under
a per-name lock, so concurrent publishes take turns and a stopped publish leaves the previous version
current (cluster/registry_versions.py: the layout; cluster/registry_lock.py: the lock). A newer
publish becomes current only when its metric is better, unless forced. Old versions stay until
`gc` removes them; the entries that `load_entry` and `list_models` give name a version's folder, so
a deployment built from them keeps loading that version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
from typing import Any

import pyarrow.fs as pafs

from cluster import registry_versions as versions
from cluster import storage
from cluster.registry_lock import NameLock
from cluster.registry_versions import WEIGHTS, RegistryError  # part of this module's API, defined below it
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
# The registry's own files, never a model's: a folder of the layout without versions holds them too.
_REGISTRY_FILES = (versions.POINTER, versions.LEGACY_META, versions.LOCK)


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
    """Copy every file under `src` except pickled weights, training state and the registry's own files
    (model.json, and the later versions a folder of the layout without versions holds), across filesystems."""
    src_fs, src_p = storage.filesystem(src)
    dst_fs, dst_p = storage.filesystem(dst)
    dst_fs.create_dir(dst_p, recursive=True)
    for info in src_fs.get_file_info(pafs.FileSelector(src_p, recursive=True)):
        rel = posixpath.relpath(info.path.replace(os.sep, "/"), src_p.replace(os.sep, "/"))
        top = rel.split("/")[0]
        if top in _SKIP_DIRS or top == versions.VERSIONS or rel.endswith(_SKIP_SUFFIXES) or rel in _REGISTRY_FILES:
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
    quantize: str | None = None,
) -> str:
    """Publish `checkpoint` as a new version of registry model `name` for `task` (None: the one task
    the checkpoint's architecture serves) and make it current; returns the version's folder.
    `quantize` ("int8"): how Serve loads it unless a deployment says otherwise (cluster.quantize);
    the weights stay the checkpoint's safetensors. `config`
    defaults to the one the checkpoint was trained with, when raylm wrote it. The better-metric rule
    and the version number are decided under the name's lock, so concurrent publishes take turns."""
    check_name(name, key="name")
    task, model_config = validate_checkpoint(checkpoint, task)
    check_weights(checkpoint, what=f"checkpoint '{checkpoint}'")
    metric = _check_metric(metric)
    if quantize not in (None, "none", "int8"):
        raise RegistryError(f"quantize '{quantize}' is not one of none, int8")
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
        "weights_sha256": weights_sha256(checkpoint),
        "quantize": quantize or "none",
    }
    dest = entry_path(name, root)
    with NameLock(storage.join(dest, versions.LOCK), f"registry model '{name}'") as lock:
        old = versions.current(dest)
        if old is not None and not force and not _metric_is_better(metric, old.get("metric")):
            raise RegistryError(
                f"registry model '{name}' already has {old.get('metric')} (version {old['version']}); the new "
                f"metric {metric} is not better. Use force=True (--force) to replace it"
            )
        entry["version"] = versions.next_version(dest)
        entry["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        path = versions.write_version(dest, entry["version"], entry, lambda folder: _fill(checkpoint, folder, entry))
        lock.check_held()
        versions.move_pointer(dest, entry)
    return path


def _fill(checkpoint: str, folder: str, entry: dict[str, Any]) -> None:
    """Copy the checkpoint's model files into a new version's folder; a local copy is read back
    against the weights' sha256 before anything can name it."""
    copy_tree(checkpoint, folder)
    if not storage.is_uri(folder):
        check_weights(folder, entry["weights_sha256"], what=f"the copy of '{checkpoint}'")


def find(name: str, root: str | None = None) -> dict[str, Any] | None:
    """The current version of registry model `name` (its model.json with `version` and `path`, the
    version's folder), or None when no model of that name is published (or `name` cannot be one)."""
    try:
        dest = entry_path(name, root)
    except ValueError:  # not a valid registry name: "org/model" is a hub id, never a registry model
        return None
    return versions.current(dest)


def load_entry(name: str, root: str | None = None) -> dict[str, Any]:
    """The current version of registry model `name`: its model.json with `version` and `path` (the
    version's folder) added. Serve pins both, so new replicas load this version whatever comes later."""
    entry = versions.current(entry_path(name, root))
    if entry is None:
        known = ", ".join(m["name"] for m in list_models(root)) or "none"
        raise RegistryError(f"no registry model '{name}' under '{registry_root(root)}' (published: {known})")
    return entry


def entry_at(path: str) -> dict[str, Any]:
    """The entry of one version folder (what `publish` returns): its model.json with `path` added."""
    return versions.at(path)


def model_names(root: str | None = None) -> list[str]:
    """Names of the registry's model folders, sorted, including one whose first publish has not
    finished (temporary and trash folders of the layout without versions are skipped)."""
    base = registry_root(root)
    fs, p = storage.filesystem(base)
    names = []
    for info in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)):
        name = posixpath.basename(info.path.replace(os.sep, "/"))
        if info.type == pafs.FileType.Directory and ".tmp-" not in name and ".old-" not in name:
            names.append(name)
    return sorted(names)


def list_models(root: str | None = None) -> list[dict[str, Any]]:
    """The current version of every published model (as `load_entry` gives it), sorted by name."""
    found = (versions.current(storage.join(registry_root(root), name)) for name in model_names(root))
    return [entry for entry in found if entry is not None]


def list_versions(name: str, root: str | None = None) -> list[dict[str, Any]]:
    """Every version of registry model `name`, oldest first: model.json with `version`, `path`,
    `complete` (False: a stopped publish's folder, never served) and `current`."""
    return versions.versions(entry_path(name, root))


def verify(name: str, root: str | None = None) -> list[str]:
    """What is wrong with the stored versions of registry model `name` ([] when nothing): the pointer
    must name a complete version and equal its model.json, and each complete version's weights must
    match the sha256 recorded when it was published. Reads every version's weights."""
    dest = entry_path(name, root)
    now, rows = versions.current(dest), versions.versions(dest)
    problems = []
    if now is None:
        problems.append(f"registry model '{name}' has no current version")
    elif not any(r["current"] and r["complete"] for r in rows):
        problems.append(f"registry model '{name}': the pointer names version {now['version']}, which is missing "
                        "or incomplete")
    for row in (r for r in rows if r["complete"]):  # an incomplete folder is never current; gc removes it
        where = f"registry model '{name}' version {row['version']} ('{row['path']}')"
        if row["current"] and row["version"] != versions.LEGACY and versions.at(row["path"]) != now:
            problems.append(f"{where}: its model.json differs from the pointer that names it")
        try:
            check_weights(row["path"], row.get("weights_sha256"), what=where)
        except RegistryError as exc:
            problems.append(str(exc))
    return problems


def catalog(root: str | None = None) -> list[dict[str, Any]]:
    """Every model folder with its versions (as `list_versions` gives them) and its current version
    (None: no publish of it has finished), sorted by name."""
    out = []
    for name in model_names(root):
        rows = list_versions(name, root)
        out.append({"name": name, "current": next((r["version"] for r in rows if r["current"]), None),
                    "versions": rows})
    return out


def gc(names: list[str] | None = None, keep: int = 2, root: str | None = None,
       dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove the versions of each model in `names` (default: all) other than its current one and its
    `keep` newest; returns what was removed (with `dry_run`, what would be). Each model is cleaned
    under its lock, so never while a publish of it writes. A deployment started on a removed version
    cannot start new replicas: redeploy before removing what it serves."""
    if keep < 0:
        raise RegistryError(f"keep must be 0 or more, not {keep}")
    known = model_names(root)
    missing = [n for n in names or [] if n not in known]
    if missing:
        raise RegistryError(f"no registry models {missing} under '{registry_root(root)}' "
                            f"(published: {', '.join(known) or 'none'})")
    removed = []
    for name in names or known:
        dest = entry_path(name, root)
        with NameLock(storage.join(dest, versions.LOCK), f"registry model '{name}'"):
            rows = versions.versions(dest)
            newest = sorted((r["version"] for r in rows if r["complete"]), reverse=True)[:keep]
            for row in rows:
                if row["current"] or row["version"] in newest:
                    continue
                if not dry_run:
                    versions.remove_version(dest, row["version"])
                removed.append({"name": name, **{k: row[k] for k in ("version", "path", "complete")}})
            if not dry_run:
                versions.remove_leftovers(dest)
    return removed


def dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=2)
