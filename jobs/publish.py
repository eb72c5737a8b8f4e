"""`raylm publish <checkpoint or run> --name gpt-tiny [--task generation] [--metric accuracy=0.91 --mode max]`

Copies a Hugging Face checkpoint (safetensors only) into a new version of the registry model,
`<RAYLM_STORAGE>/registry/<name>/versions/<n>/` with its model.json, makes it the current version,
prints its entry as JSON and the version's path last (`raylm registry list` shows every version). A finished fine-tuning run, sweep,
distillation or pretraining run, by name or by its folder, stands for its best checkpoint (else its final one),
and unless --metric is given the registry records that checkpoint's metric from the run's summary
(a sweep's objective, a fine-tuning run's task metric, else val_loss).
The task defaults to the one the checkpoint's architecture serves (a *ForCausalLM generates, a
*ForMaskedLM fills masks).
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster import registry, storage
from cluster.runs import CHECKPOINT_JOBS, RunLookupError, is_run_dir, named_run, run_checkpoint, run_metric


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylm publish", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory or URI (model.safetensors + config + tokenizer), "
                   "or a finished run: its folder, or its name under $RAYLM_STORAGE/finetune, /tune, /distill or /pretrain")
    p.add_argument("--name", required=True, help="registry name, e.g. gpt-tiny")
    p.add_argument("--task", choices=registry.TASKS,
                   help="default: the one task the checkpoint's architecture serves")
    p.add_argument("--metric", help="NAME=VALUE, e.g. accuracy=0.91; a better metric replaces an older model "
                   "(default for a run: its metric from summary.json)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="whether a larger metric is better")
    p.add_argument("--labels", help="comma-separated labels (default: the checkpoint's id2label)")
    p.add_argument("--sweep-id", help="the sweep that produced the checkpoint")
    p.add_argument("--quantize", choices=("none", "int8"), help="how Serve loads the model unless its deployment "
                   "says otherwise: int8 Linear layers on CPU replicas (the weights stay as published)")
    p.add_argument("--root", help="registry root (default: $RAYLM_STORAGE/registry)")
    p.add_argument("--force", action="store_true", help="replace the published model even if not better")
    return p.parse_args(argv)


def resolve_source(arg: str) -> tuple[str, dict | None]:
    """(checkpoint, metric) that `arg` names: itself and no metric, or a finished run's best (else
    final) checkpoint and its metric from the run's summary when `arg` is a run folder or the name
    of a fine-tuning run, sweep or pretraining run under the storage root."""
    if storage.exists(arg) or storage.is_uri(arg):
        if not is_run_dir(arg):
            return arg, None
        return _run_source(arg)
    if "/" in arg or arg.startswith("."):
        return arg, None  # a path that does not exist: validate_checkpoint says so
    try:
        found = named_run(arg)
    except RunLookupError as exc:
        raise registry.RegistryError(str(exc)) from None
    if found is None:
        runs = [storage.join(storage.storage_root(), job, arg) for job in CHECKPOINT_JOBS]
        raise registry.RegistryError(
            f"checkpoint '{arg}' does not exist, and no run of that name is under {', '.join(runs)}"
        )
    return _run_source(found)


def _run_source(run_dir: str) -> tuple[str, dict | None]:
    picked = run_checkpoint(run_dir)
    if not picked:
        raise registry.RegistryError(f"run '{run_dir}' finished without a checkpoint")
    return picked, run_metric(run_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metric = None
    if args.metric:
        key, sep, value = args.metric.partition("=")
        try:
            metric = {"name": key.strip(), "value": float(value), "mode": args.mode}
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            print(f"error: --metric '{args.metric}': expected NAME=NUMBER, e.g. accuracy=0.91", file=sys.stderr)
            return 2
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    try:
        checkpoint, summary_metric = resolve_source(args.checkpoint)
        if checkpoint != args.checkpoint:
            print(f"publishing {checkpoint}", file=sys.stderr)
        if metric is None and summary_metric is not None:  # --metric wins over the run's own
            metric = summary_metric
            print(f"metric from the run's summary: {metric['name']}={metric['value']:.6g} ({metric['mode']})",
                  file=sys.stderr)
        path = registry.publish(
            checkpoint, args.name, args.task, metric=metric, labels=labels,
            sweep_id=args.sweep_id, force=args.force, root=args.root, quantize=args.quantize,
        )
    except (registry.RegistryError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(registry.entry_at(path), indent=2))  # this publish's version, whatever was published since
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
