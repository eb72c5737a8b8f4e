"""`raylm registry list [--json]` and `raylm registry gc [--keep K] [--dry-run] [NAME...]`

`list` shows each registry model, its current version and every version with its metric, date and
weights digest. `gc` removes the versions of each named model (default: all) other than the current
one and the K newest; the current version is never removed. A deployment started before the last
publish still loads the version it started with when a replica restarts: keep that version (the
default K=2 keeps the current one and the one before) or redeploy before removing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cluster import registry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raylm registry", description=__doc__.splitlines()[0])
    p.add_argument("--root", help="registry root (default: $RAYLM_STORAGE/registry)")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every model, its current version and all its versions")
    ls.add_argument("--json", action="store_true", help="one JSON list of models with their versions")
    gc = sub.add_parser("gc", help="remove old versions (never a model's current one)")
    gc.add_argument("names", nargs="*", metavar="NAME", help="models to clean (default: all)")
    gc.add_argument("--keep", type=int, default=2, help="how many of the newest versions to keep; the "
                    "current one is always kept (default 2: the current and the one before it)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    return p.parse_args(argv)


def _metric(m: dict[str, Any] | None) -> str:
    return f"{m['name']}={m['value']:.6g} ({m['mode']})" if m else "-"


def show(models: list[dict[str, Any]]) -> str:
    lines = [f"  {'':1} {'ver':>4}  {'created':25}  {'metric':28}  {'sha256':12}  path   (* current, ! incomplete)"]
    for m in models:
        tasks = {r.get("task") for r in m["versions"] if r.get("task")}
        lines.append(f"{m['name']}  {'/'.join(sorted(tasks)) or '?'}  current: "
                     f"{'none (no publish finished)' if m['current'] is None else m['current']}")
        for r in reversed(m["versions"]):
            state = "*" if r["current"] else " " if r["complete"] else "!"
            note = " (layout without versions)" if r["version"] == 0 else "" if r["complete"] else " (incomplete)"
            lines.append(f"  {state} {r['version']:>4}  {r.get('created') or '-':25}  {_metric(r.get('metric')):28}  "
                         f"{(r.get('weights_sha256') or '-')[:12]:12}  {r['path']}{note}")
    return "\n".join(lines) if models else "no models in the registry"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "list":
            models = registry.catalog(args.root)
            print(json.dumps(models, indent=2) if args.json else show(models))
            return 0
        removed = registry.gc(args.names or None, keep=args.keep, root=args.root, dry_run=args.dry_run)
    except (registry.RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for r in removed:
        print(f"{verb} {r['name']} version {r['version']}{'' if r['complete'] else ' (incomplete)'}: {r['path']}")
    print(f"{verb} {len(removed)} version(s) from registry '{registry.registry_root(args.root)}'", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
