"""Language-model pretraining objectives on a prepared corpus: next-token prediction (CausalLM) and
masked LM with an optional sentence-pair task (MaskedLM: NSP for BERT, SOP for ALBERT), and the
`objective:` config section that sets masking and pairing."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from cluster.config import Section
from cluster.objectives import masking
from cluster.objectives.base import stack_rows
from cluster.objectives.pairs import build_pairs, build_single


class CausalLM:
    """Next-token prediction on packed blocks: every position but the first of a block is a target."""

    name = "clm"

    def __init__(self, bytes_per_token: float):
        self.bytes_per_token = bytes_per_token

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Any) -> CausalLM:
        return cls(spec["bytes_per_token"])

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(stack_rows(batch["input_ids"]).astype(np.int64))  # (B, T)
        return {"input_ids": ids}

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = inputs["input_ids"]
        # no KV cache in training: nothing reads it, and with activation checkpointing transformers
        # turns it off itself with a warning from every worker
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        # Loss in fp32 whatever the autocast dtype: bits per byte needs exact sums.
        nats = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        tokens = torch.tensor(float(ids[:, 1:].numel()), device=ids.device)
        return nats / tokens, {"nats": nats.detach(), "tokens": tokens}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nats"] / max(sums["tokens"], 1.0)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / math.log(2) / self.bytes_per_token,
        }


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed nats, count, correct) over positions whose label is not -100, in fp32."""
    flat_logits, flat_labels = logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1)
    nats = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    valid = flat_labels != -100
    correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
    return nats, valid.sum().to(nats.dtype), correct.to(nats.dtype)


class MaskedLM:
    """BERT-family pretraining on sentence-aware chunks: masked-LM, optionally with a pair task
    (NSP for BERT, SOP for ALBERT). Masking happens here, on the worker, so it is fresh each epoch
    unless `static` (then it depends only on the example, as in the original BERT)."""

    def __init__(self, tokenizer: Any, pair: str | None, max_len: int, rate: float, whole_word: bool,
                 static: bool, seed: int, word_segmenter: str | None = None):
        self.special = masking.SpecialTokens.from_tokenizer(tokenizer)
        self.word_starts = torch.from_numpy(masking.word_start_table(tokenizer)) if whole_word else None
        if word_segmenter and not whole_word:
            raise ValueError(f"word segmenter '{word_segmenter}' without whole-word masking")
        # CJK runs regrouped into the segmenter's words
        self.cjk_words = masking.CJKWords(tokenizer, masking.segmenter(word_segmenter)) if word_segmenter else None
        self.pair, self.max_len, self.rate, self.static, self.seed = pair, max_len, rate, static, seed
        self.name = "mlm" + (f"+{pair}" if pair else "")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tokenizer: Any) -> MaskedLM:
        """spec["mlm"]: ObjectiveConfig.masking's dict; spec["seed"]: the run's seed."""
        m = spec["mlm"]
        return cls(tokenizer, m["pair"], m["max_len"], m["mask_rate"], m["whole_word"], m["static_masking"],
                   spec["seed"], m.get("word_segmenter"))

    def _rows(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        return [
            {"input_ids": np.asarray(ids), "sentence_starts": np.asarray(starts), "doc_id": int(doc)}
            for ids, starts, doc in zip(batch["input_ids"], batch["sentence_starts"], batch["doc_id"], strict=True)
        ]

    def _mask(self, ids: torch.Tensor, rows: list[dict], seed: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.word_starts
        if self.cjk_words is not None:
            starts = self.cjk_words.starts(ids, self.word_starts)  # (B, T)
        if not self.static:
            gen = masking.dynamic_mask_generator(*seed)
            return masking.mask_tokens(ids, self.special, self.rate, gen, starts)
        masked, labels = [], []
        for i, row in enumerate(rows):
            key = int.from_bytes(np.asarray(row["input_ids"][:16], dtype=np.int64).tobytes()[:8], "little") ^ row["doc_id"]
            gen = masking.static_mask_generator(self.seed, key)
            row_starts = starts[i : i + 1] if starts is not None and starts.dim() == 2 else starts
            m, lab = masking.mask_tokens(ids[i : i + 1], self.special, self.rate, gen, row_starts)
            masked.append(m)
            labels.append(lab)
        return torch.cat(masked), torch.cat(labels)

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        rows = self._rows(batch)
        rng = np.random.default_rng([abs(s) for s in seed])
        if self.pair:
            arrays = build_pairs(rows, self.pair, self.max_len, rng, self.special)
        else:
            arrays = build_single(rows, self.max_len, self.special)
        ids = torch.from_numpy(arrays["input_ids"]).long()  # (B, max_len)
        masked, labels = self._mask(ids, rows, seed)
        # Drop the columns that are padding in every row: with segments much shorter than max_len,
        # they were most of the batch's compute (the MLM head scores every position). Masks are
        # drawn at full width first, so a static mask does not depend on the rest of the batch.
        width = int(arrays["attention_mask"].sum(axis=1).max())
        out = {
            "input_ids": masked[:, :width],
            "attention_mask": torch.from_numpy(arrays["attention_mask"][:, :width]).long(),
            "token_type_ids": torch.from_numpy(arrays["token_type_ids"][:, :width]).long(),
            "labels": labels[:, :width],
        }  # each (B, T), T <= max_len
        if self.pair:
            out["pair_label"] = torch.from_numpy(arrays["pair_label"]).long()
        return out

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    token_type_ids=inputs["token_type_ids"])
        mlm_logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        nats, count, correct = _sum_ce(mlm_logits, inputs["labels"])
        loss = nats / count.clamp(min=1)
        stats = {"mlm_nats": nats.detach(), "mlm_tokens": count, "mlm_correct": correct}
        if self.pair:
            pair_logits = out.seq_relationship_logits if self.pair == "nsp" else out.sop_logits  # (B, 2)
            p_nats, p_count, p_correct = _sum_ce(pair_logits, inputs["pair_label"])
            loss = loss + p_nats / p_count.clamp(min=1)  # a batch may hold no valid pair
            stats |= {"pair_nats": p_nats.detach(), "pair_count": p_count, "pair_correct": p_correct}
        return loss, stats

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        mlm = sums["mlm_nats"] / max(sums["mlm_tokens"], 1.0)
        out = {"mlm_loss": mlm, "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_tokens"], 1.0),
               "perplexity": math.exp(min(mlm, 50.0)), "loss": mlm}
        if self.pair:
            pair = sums["pair_nats"] / max(sums["pair_count"], 1.0)
            out |= {f"{self.pair}_loss": pair, f"{self.pair}_accuracy": sums["pair_correct"] / max(sums["pair_count"], 1.0),
                    "loss": mlm + pair}
        return out


class ObjectiveConfig(Section):
    """Encoder objectives (ignored by causal LMs, which always predict the next token)."""

    pair: Literal["auto", "none", "nsp", "sop"] = Field(
        "auto", description="sentence-pair task: auto = NSP for bert, SOP for albert, none for roberta"
    )
    mask_rate: float = Field(0.15, gt=0, lt=1, description="share of non-special tokens selected for MLM")
    whole_word: bool = Field(False, description="select whole words instead of sub-word tokens")
    word_segmenter: Literal["none", "jieba"] = Field(
        "none", description="whole_word: cut runs of CJK characters into words with this segmenter (Chinese "
        "BERT-wwm); none: each character is a word")
    static_masking: bool = Field(False, description="fixed mask per example (original BERT) instead of dynamic")

    @model_validator(mode="after")
    def _segmenter(self) -> ObjectiveConfig:
        if self.word_segmenter != "none" and not self.whole_word:
            raise ValueError(f"word_segmenter '{self.word_segmenter}' groups characters into words for whole-word "
                             "masking: set whole_word true as well")
        return self

    def check_segmenter(self) -> str | None:
        """A problem with the configured word segmenter on this machine (its package missing), or None."""
        if self.word_segmenter == "none":
            return None
        import importlib.util

        if importlib.util.find_spec(self.word_segmenter) is None:
            return (f"objective.word_segmenter '{self.word_segmenter}': the {self.word_segmenter} package is not "
                    f"installed (pip install {self.word_segmenter}, on every node)")
        return None

    def pair_task(self, family: str) -> str | None:
        if self.pair == "auto":
            return {"bert": "nsp", "albert": "sop"}.get(family)
        return None if self.pair == "none" else self.pair

    def masking(self, pair: str | None, max_len: int) -> dict[str, Any]:
        """MaskedLM's options as the plain dict an objective spec carries (`spec["mlm"]`)."""
        return {"pair": pair, "max_len": max_len, "mask_rate": self.mask_rate, "whole_word": self.whole_word,
                "static_masking": self.static_masking,
                "word_segmenter": None if self.word_segmenter == "none" else self.word_segmenter}
