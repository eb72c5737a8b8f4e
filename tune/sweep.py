"""tune.sweep: search fine-tuning hyperparameters with Ray Tune and publish the best model.

    python -m tune.sweep --config configs/tune-topic-tiny.yaml [--set num_samples=8]
    ray job submit --working-dir . -- python -m tune.sweep --config configs/tune-topic-tiny.yaml
Re-running the same command after an interruption resumes the sweep (finished trials are kept).
"""

from __future__ import annotations

import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from tune.config import SweepConfig
from tune.driver import sweep


def run(cfg: SweepConfig) -> str:
    summary = sweep(cfg)
    return RunDir("tune", cfg.name).write_summary(summary)


def main(argv: list[str] | None = None) -> int:
    return run_job("tune.sweep", SweepConfig, argv, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
