"""The `raylm` command: a thin front door to the jobs, sweeps, Serve app and cluster tools.

`raylm prepare notes/*.txt books.jsonl --name mycorpus` is the common case with no config file;
every other subcommand forwards its arguments to the module that `python -m` would run.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose `main(argv)` runs it; the same module runs under `python -m`.
COMMANDS = {
    "prepare": "jobs.prepare",
    "pretrain": "jobs.pretrain",
    "finetune": "jobs.finetune",
    "distill": "jobs.distill",
    "prune": "jobs.prune",
    "evaluate": "jobs.evaluate",
    "demo": "jobs.demo",
    "sweep": "tune.sweep",
    "publish": "jobs.publish",
    "registry": "jobs.registry",
    "serve": "serve.cli",
    "cluster": "cluster.ops.local",
}


USAGE = "usage: raylm {" + ",".join(COMMANDS) + "} [args...]   (raylm COMMAND --help for details)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"raylm: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command])
    except ModuleNotFoundError as exc:
        print(f"raylm: '{command}' is not available in this install ({exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
