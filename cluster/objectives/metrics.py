"""Task metrics as sums that reduce across batches and ranks by addition, then finish into scores.

Classification: per-class true/false positives and false negatives give accuracy and macro-F1.
Tagging: entities are read from BIO tags by seqeval (its default, CoNLL-style rules), matched per
sequence, and counted, so the reduced counts give exactly seqeval's micro precision/recall/F1.
Completion: ROUGE-L (rouge-score) and corpus BLEU (sacrebleu) over generated texts, computed once
on the gathered samples because neither is a plain sum.
"""

from __future__ import annotations

from collections.abc import Sequence

# validation metric -> "max"/"min", per task (what a sweep may optimise)
METRICS: dict[str, dict[str, str]] = {
    "classification": {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"},
    "tagging": {"val_loss": "min", "val_token_accuracy": "max", "val_entity_precision": "max",
                "val_entity_recall": "max", "val_entity_f1": "max"},
    "completion": {"val_loss": "min", "val_perplexity": "min", "val_rouge_l": "max", "val_bleu": "max"},
}


# what a sweep optimises unless told, and what a published fine-tuning run records
DEFAULT_METRIC = {"classification": "val_accuracy", "tagging": "val_entity_f1", "completion": "val_rouge_l"}


IGNORE_INDEX = -100


def class_counts(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """Summable counts: correct, count, and tp_k / fp_k / fn_k for every class k (fixed keys, so
    every rank reduces the same dict)."""
    out = {"correct": 0.0, "count": float(len(gold))}
    for k in range(num_labels):
        out[f"tp_{k}"] = out[f"fp_{k}"] = out[f"fn_{k}"] = 0.0
    for p, g in zip(pred, gold, strict=True):
        if p == g:
            out["correct"] += 1
            out[f"tp_{g}"] += 1
        else:
            out[f"fp_{p}"] += 1
            out[f"fn_{g}"] += 1
    return out


def f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def classification_scores(sums: dict[str, float], num_labels: int) -> dict[str, float]:
    """accuracy and macro-F1. Like scikit-learn's default, the macro average runs over classes that
    occur in the gold labels or the predictions; a class absent from both is not averaged in."""
    scores = []
    for k in range(num_labels):
        tp, fp, fn = sums[f"tp_{k}"], sums[f"fp_{k}"], sums[f"fn_{k}"]
        if tp + fp + fn:
            scores.append(f1(tp, fp, fn))
    return {
        "accuracy": sums["correct"] / max(sums["count"], 1.0),
        "macro_f1": sum(scores) / len(scores) if scores else 0.0,
    }


def entity_types(labels: Sequence[str]) -> list[str]:
    """Entity types named by a BIO label set, e.g. [O, B-PER, I-PER, B-LOC] -> [LOC, PER]."""
    return sorted({label.split("-", 1)[1] for label in labels if label[:2] in ("B-", "I-")})


def entity_counts(pred_tags: list[list[str]], gold_tags: list[list[str]], types: Sequence[str]) -> dict[str, float]:
    """Summable entity counts per type (tp_T, fp_T, fn_T) and in total, with seqeval's entity rules."""
    from seqeval.metrics.sequence_labeling import get_entities

    out = {f"{k}_{t}": 0.0 for t in types for k in ("tp", "fp", "fn")}
    for pred, gold in zip(pred_tags, gold_tags, strict=True):
        p, g = set(get_entities(list(pred))), set(get_entities(list(gold)))
        for kind, members in (("tp", p & g), ("fp", p - g), ("fn", g - p)):
            for entity_type, _, _ in members:
                if f"{kind}_{entity_type}" in out:
                    out[f"{kind}_{entity_type}"] += 1
    return out


def entity_scores(sums: dict[str, float], types: Sequence[str]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 (seqeval's "micro avg")."""
    tp = sum(sums[f"tp_{t}"] for t in types)
    fp = sum(sums[f"fp_{t}"] for t in types)
    fn = sum(sums[f"fn_{t}"] for t in types)
    return {
        "entity_precision": tp / (tp + fp) if tp + fp else 0.0,
        "entity_recall": tp / (tp + fn) if tp + fn else 0.0,
        "entity_f1": f1(tp, fp, fn),
    }


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L F-measure (rouge-score, stemmed) and corpus BLEU (sacrebleu), both 0..100."""
    import sacrebleu
    from rouge_score import rouge_scorer, tokenizers

    if not references:
        return {"rouge_l": 0.0, "bleu": 0.0}
    # The default tokenizer, handed in: built by RougeScorer itself it logs "Using default
    # tokenizer." at INFO, a line in the job's console at every evaluation.
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    return {"rouge_l": 100.0 * sum(rouge) / len(rouge), "bleu": float(bleu.score)}
