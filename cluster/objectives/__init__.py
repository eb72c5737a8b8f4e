"""What a batch means to the model: every training objective, chosen by name from one table.

Pretraining (`clm`, `mlm`), fine-tuning (`classification`, `tagging`, `completion`) and evaluation
all call `build(spec, tokenizer)`. A spec is a plain dict (it crosses the Ray boundary to workers and
evaluation actors): `kind` plus what that objective's `from_spec` reads. The table is filled on first
use, so importing `cluster.objectives.metrics` on a job's driver does not import torch.
"""

from __future__ import annotations

from typing import Any


def objective_classes() -> dict[str, Any]:
    """Objective name -> class."""
    from cluster.objectives.lm import CausalLM, MaskedLM
    from cluster.objectives.tasks import Completion, SequenceClassification, TokenClassification

    return {"clm": CausalLM, "mlm": MaskedLM, "classification": SequenceClassification,
            "tagging": TokenClassification, "completion": Completion}


def build(spec: dict[str, Any], tokenizer: Any) -> Any:
    """The objective `spec["kind"]` names, built from the rest of `spec`."""
    classes = objective_classes()
    if spec["kind"] not in classes:
        raise ValueError(f"unknown objective '{spec['kind']}' (known: {', '.join(classes)})")
    return classes[spec["kind"]].from_spec(spec, tokenizer)
