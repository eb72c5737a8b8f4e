"""jobs.finetune: adapt a pretrained checkpoint to a labelled task on Ray Train workers.

    python -m jobs.finetune --config configs/finetune-topic-tiny.yaml [--set strategy.kind=lora]
    ray job submit --working-dir . -- python -m jobs.finetune --config configs/finetune-entities-tiny.yaml
A re-submitted run with the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.finetune import FinetuneConfig, finetune


def run(cfg: FinetuneConfig) -> str:
    summary = finetune(cfg)
    return RunDir("finetune", cfg.name).write_summary(summary)


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.finetune", FinetuneConfig, argv, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
