"""`raylm publish <checkpoint> --name gpt-tiny --task generation [--metric accuracy=0.91 --mode max]`

Copies a Hugging Face checkpoint (safetensors only) into `<RAYLM_STORAGE>/registry/<name>/` with
its model.json, and prints the registry path last.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster import registry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylm publish", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory or URI (model.safetensors + config + tokenizer)")
    p.add_argument("--name", required=True, help="registry name, e.g. gpt-tiny")
    p.add_argument("--task", required=True, choices=registry.TASKS)
    p.add_argument("--metric", help="NAME=VALUE, e.g. accuracy=0.91; a better metric replaces an older model")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="whether a larger metric is better")
    p.add_argument("--labels", help="comma-separated labels (default: the checkpoint's id2label)")
    p.add_argument("--sweep-id", help="the sweep that produced the checkpoint")
    p.add_argument("--root", help="registry root (default: $RAYLM_STORAGE/registry)")
    p.add_argument("--force", action="store_true", help="replace the published model even if not better")
    return p.parse_args(argv)


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
        path = registry.publish(
            args.checkpoint, args.name, args.task, metric=metric, labels=labels,
            sweep_id=args.sweep_id, force=args.force, root=args.root,
        )
    except (registry.RegistryError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(registry.load_entry(args.name, args.root), indent=2))
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
