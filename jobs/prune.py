"""jobs.prune: remove the least important attention heads of a fine-tuned model (Llama family).

    raylm prune topic-llama --heads 0.25 --name topic-llama-pruned [--set data.validation=test.csv ...]
    python -m jobs.prune --config configs/prune-topic-tiny.yaml
The pruned checkpoint is <RAYLM_STORAGE>/prune/<name>/checkpoint (transformers loads it alone);
the summary holds the head importances, the parameters and the task metrics before and after.
`raylm publish <name>` publishes it.
"""

from __future__ import annotations

import argparse
import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.prune import PruneConfig, prune


def run(cfg: PruneConfig) -> str:
    summary = prune(cfg)
    return RunDir("prune", cfg.name).write_summary(summary)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="the model to prune (else the config's `model`)")
    p.add_argument("--heads", type=float, help="share of each layer's heads to remove, e.g. 0.25")
    p.add_argument("--name", help="run name (the pruned checkpoint's folder under prune/)")


def _sets(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in (("model", ns.model), ("heads", ns.heads), ("name", ns.name)) if v is not None}


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.prune", PruneConfig, argv, run, __doc__, extra_args=_args, config_from_args=_sets)


if __name__ == "__main__":
    sys.exit(main())
