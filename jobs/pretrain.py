"""jobs.pretrain: stream a prepared corpus into Ray Train TorchTrainer workers.

    python -m jobs.pretrain --config configs/gpt-tiny.yaml [--set train.max_steps=200]
    ray job submit --working-dir . -- python -m jobs.pretrain --config configs/gpt-small.yaml
A re-submitted run with the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.pretrain import PretrainConfig, pretrain


def run(cfg: PretrainConfig) -> str:
    summary = pretrain(cfg)  # connects to Ray once its inputs are checked
    return RunDir("pretrain", cfg.name).write_summary(summary)


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.pretrain", PretrainConfig, argv, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
