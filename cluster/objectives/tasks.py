"""Fine-tuning objectives for the shared loop (cluster.train.loop): sequence classification, token
classification (BIO tagging) and prompt -> completion language modelling.

Rows arrive tokenized by cluster.data.task_prep with variable lengths; `collate` pads them per batch.
`forward` returns the loss and summable statistics (see cluster.objectives.metrics); statistics that need a
Python pass over predictions (per-class and per-entity counts) are taken in eval mode only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from cluster.config import Section
from cluster.objectives import metrics as M

IGNORE_INDEX = -100


class EvalOptions(Section):
    """Generation during a completion model's evaluation (fine-tuning and jobs.evaluate)."""

    generate_examples: int = Field(64, ge=0, description="completion: validation prompts generated per evaluation")
    max_new_tokens: int = Field(32, ge=1, description="completion: tokens generated per prompt")


def pad_rows(rows: Any, value: int, dtype: Any = np.int64) -> np.ndarray:
    """Variable-length rows (an object array of 1-D arrays, or a 2-D array) -> (B, T) padded right."""
    rows = [np.asarray(r) for r in rows]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def attention_mask(rows: Any) -> np.ndarray:
    return pad_rows([np.ones(len(r), dtype=np.int64) for r in rows], 0)


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nats, count) over labels that are not -100, in fp32."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    target = labels.reshape(-1)
    nats = torch.nn.functional.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return nats, (target != IGNORE_INDEX).sum().to(nats.dtype)


class SequenceClassification:
    """One label per text (or text pair); the model's head scores the sequence."""

    name = "classification"
    metrics = ("loss", "accuracy", "macro_f1")

    def __init__(self, labels: list[str], pad_id: int, token_types: bool):
        self.labels, self.pad_id, self.token_types = labels, pad_id, token_types

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Any) -> SequenceClassification:
        return cls(spec["labels"], spec["pad_id"], spec["token_types"])

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        out = {
            "input_ids": torch.from_numpy(pad_rows(batch["input_ids"], self.pad_id)),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask(batch["input_ids"])),  # (B, T)
            "labels": torch.from_numpy(np.array(batch["label"], dtype=np.int64)),  # (B,)
        }
        if self.token_types:
            out["token_type_ids"] = torch.from_numpy(pad_rows(batch["token_type_ids"], 0))
        return out

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = inputs["labels"]
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**kwargs).logits  # (B, C)
        nats = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        pred = logits.argmax(-1)
        stats: dict[str, Any] = {"nats": nats.detach()}
        if model.training:
            stats |= {"correct": (pred == labels).sum(), "count": float(labels.numel())}
        else:
            stats |= M.class_counts(pred.tolist(), labels.tolist(), len(self.labels))
        return nats / labels.numel(), stats

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"loss": sums["nats"] / max(sums["count"], 1.0)}
        if "tp_0" in sums:
            out |= M.classification_scores(sums, len(self.labels))
        else:
            out["accuracy"] = sums["correct"] / max(sums["count"], 1.0)
        return out


class TokenClassification:
    """BIO tagging scored on the first sub-token of each word (other positions carry -100)."""

    name = "tagging"
    metrics = ("loss", "token_accuracy", "entity_precision", "entity_recall", "entity_f1")

    def __init__(self, labels: list[str], pad_id: int):
        self.labels, self.pad_id = labels, pad_id
        self.types = M.entity_types(labels)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Any) -> TokenClassification:
        return cls(spec["labels"], spec["pad_id"])

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(pad_rows(batch["input_ids"], self.pad_id)),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask(batch["input_ids"])),  # (B, T)
            "labels": torch.from_numpy(pad_rows(batch["labels"], IGNORE_INDEX)),  # (B, T)
        }

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = inputs["labels"]
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # (B, T, C)
        nats, count = _sum_ce(logits, labels)
        scored = labels != IGNORE_INDEX
        pred = logits.argmax(-1)
        stats: dict[str, Any] = {"nats": nats.detach(), "tokens": count, "correct": (pred[scored] == labels[scored]).sum()}
        if not model.training:
            gold_tags, pred_tags = [], []
            for p, g, s in zip(pred.tolist(), labels.tolist(), scored.tolist(), strict=True):
                gold_tags.append([self.labels[x] for x, keep in zip(g, s, strict=True) if keep])
                pred_tags.append([self.labels[x] for x, keep in zip(p, s, strict=True) if keep])
            stats |= M.entity_counts(pred_tags, gold_tags, self.types)
        return nats / count.clamp(min=1), stats

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"loss": sums["nats"] / max(sums["tokens"], 1.0),
               "token_accuracy": sums["correct"] / max(sums["tokens"], 1.0)}
        if self.types and f"tp_{self.types[0]}" in sums:
            out |= M.entity_scores(sums, self.types)
        return out


class Completion:
    """Causal LM on prompt + completion + EOS with the loss on the completion (and EOS) only.
    Evaluation also generates greedy completions for up to `sample_limit` validation prompts and
    scores them with ROUGE-L and BLEU against the reference completions."""

    name = "completion"
    metrics = ("loss", "perplexity", "rouge_l", "bleu")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Any) -> Completion:
        """spec["sample_cap"]: prompts generated per evaluation (split over the ranks by the loop)."""
        return cls(tokenizer, spec["sample_cap"], spec["max_new_tokens"])

    def __init__(self, tokenizer: Any, sample_limit: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.sample_limit, self.max_new_tokens = sample_limit, max_new_tokens

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        ids = pad_rows(batch["input_ids"], self.pad_id)  # (B, T)
        lengths = np.array([len(r) for r in batch["input_ids"]])
        prompt_len = np.array(batch["prompt_len"], dtype=np.int64)  # a copy: Ray Data hands read-only arrays
        pos = np.arange(ids.shape[1])[None, :]
        labels = np.where((pos >= prompt_len[:, None]) & (pos < lengths[:, None]), ids, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attention_mask(batch["input_ids"])),
            "labels": torch.from_numpy(labels),  # (B, T): targets at completion positions only
            "prompt_len": torch.from_numpy(prompt_len),  # (B,)
        }

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       use_cache=False).logits  # (B, T, V); no KV cache in training, as in losses.CausalLM
        nats, count = _sum_ce(logits[:, :-1], inputs["labels"][:, 1:])  # position t predicts t + 1
        return nats / count.clamp(min=1), {"nats": nats.detach(), "tokens": count}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nats"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def generate(self, model: Any, inputs: dict[str, torch.Tensor], limit: int) -> list[tuple[str, str]]:
        """(generated, reference) completions for the first `limit` rows, greedy, one left-padded batch."""
        ids, labels, prompt_len = inputs["input_ids"], inputs["labels"], inputs["prompt_len"]
        n = min(limit, ids.size(0))
        if n <= 0:
            return []
        width = int(prompt_len[:n].max())
        prompts = torch.full((n, width), self.pad_id, dtype=torch.long, device=ids.device)
        mask = torch.zeros_like(prompts)
        for i in range(n):
            p = int(prompt_len[i])
            prompts[i, width - p :], mask[i, width - p :] = ids[i, :p], 1
        out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                             do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        pairs = []
        for i in range(n):
            new = out[i, width:].tolist()
            new = new[: new.index(self.eos_id)] if self.eos_id in new else new
            ref = [t for t in labels[i].tolist() if t != IGNORE_INDEX and t != self.eos_id]
            pairs.append((self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                          self.tokenizer.decode(ref, skip_special_tokens=True).strip()))
        return pairs

    def score_samples(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        return M.generation_scores([h for h, _ in pairs], [r for _, r in pairs])
