"""What the training loop optimises: a batch from the corpus -> model inputs -> loss and summable
statistics. The loop in cluster.train knows nothing else about the model family or the task.

`stats` are sums (nats, tokens, correct, ...) so they reduce across ranks and batches by addition;
`summarize` turns reduced sums into metrics.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch


class Objective(Protocol):
    name: str

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]: ...

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]: ...


def stack_rows(column: np.ndarray) -> np.ndarray:
    """A list column from Parquet arrives as a 2-D array or an object array of 1-D arrays."""
    if column.dtype == object:
        return np.stack([np.asarray(r) for r in column])
    return np.asarray(column)


class CausalLM:
    """Next-token prediction on packed blocks: every position but the first of a block is a target."""

    name = "clm"

    def __init__(self, bytes_per_token: float):
        self.bytes_per_token = bytes_per_token

    def collate(self, batch: dict[str, np.ndarray], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(stack_rows(batch["input_ids"]).astype(np.int64))  # (B, T)
        return {"input_ids": ids}

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = inputs["input_ids"]
        logits = model(input_ids=ids).logits  # (B, T, V)
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
