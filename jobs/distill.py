"""jobs.distill: train a smaller student from a fine-tuned teacher (task data) or a pretrained one
(a prepared corpus: `task: lm` for GPT/Llama, `task: mlm` for BERT/RoBERTa/ALBERT) on Ray Train workers.

    python -m jobs.distill --config configs/distill-topic-tiny.yaml [--set student.layers=1 distill.alpha=0.7]
    python -m jobs.distill --config configs/distill-bert-tiny.yaml
    ray job submit --working-dir . -- python -m jobs.distill --config configs/distill-topic-tiny.yaml
A re-submitted run with the same name resumes from its latest checkpoint; `raylm publish <name>`
publishes the student.
"""

from __future__ import annotations

import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.distill import DistillConfig, distill


def run(cfg: DistillConfig) -> str:
    summary = distill(cfg)
    return RunDir("distill", cfg.name).write_summary(summary)


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.distill", DistillConfig, argv, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
