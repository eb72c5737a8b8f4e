"""What every objective offers the training loop: `collate` (a batch of rows -> model inputs),
`forward` (loss and summable statistics) and `summarize` (reduced sums -> metrics).

`stats` are sums (nats, tokens, correct, ...) so they reduce across ranks and batches by addition.
"""

from __future__ import annotations

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
