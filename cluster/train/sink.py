"""Where a run's metrics go (rank 0): metrics.jsonl, TensorBoard, MLflow when configured, and one
console line per log interval; plus the FLOPs per token and GPU peak behind the MFU figure.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from cluster import storage, tracking
from cluster.train.placement import unwrap

log = logging.getLogger(__name__)


# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM appendix B).
    L and d come from the Hugging Face config (`num_hidden_layers`/`hidden_size` alias every family)."""
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    config = unwrap(model).config
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def progress_line(row: dict[str, Any], max_steps: int) -> str | None:
    """One console line for a metrics row (train, validation or resume), or None for other rows."""
    split, step = row.get("split"), row.get("step")
    if split == "train":
        loss = f"loss {row['train_loss']:.4f}" if "train_loss" in row else "loss -"
        mfu = f" | mfu {row['mfu'] * 100:.1f}%" if "mfu" in row else ""
        return (f"step {step}/{max_steps} epoch {row['epoch']} | {loss} | lr {row['lr']:.2e} | "
                f"grad norm {row['grad_norm']:.3g} | {row['tokens_per_s']:,.0f} tokens/s{mfu} | "
                f"data wait {row['data_wait_fraction'] * 100:.1f}% | {_duration(row['elapsed_s'])} elapsed, "
                f"eta {_duration(row['eta_s'])}")
    if split == "validation":
        shown = [(k[4:], v) for k, v in row.items() if k.startswith("val_") and isinstance(v, int | float)]
        return f"step {step}/{max_steps} validation | " + " | ".join(f"{k} {v:.4g}" for k, v in shown)
    if split == "resume":
        return f"resumed at step {step} (epoch {row['epoch']}, micro-batch {row['batches_in_epoch']} of that epoch)"
    return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# How often metrics.jsonl and the data trace are rewritten on an object store (which cannot append),
# besides before every checkpoint and at the end: a tail of a run's rows shows up this late there.
REMOTE_FLUSH_S = 30.0


def tensorboard_writer(path: str) -> Any:
    """A TensorBoard SummaryWriter for a local folder or an object-store URI, or None where
    TensorBoard cannot write. Its own file layer writes s3:// through boto3 (the same credentials
    and AWS_ENDPOINT_URL as pyarrow), rewriting the event file whole at each flush as S3 cannot
    append; other schemes go through fsspec and need its filesystem package (gcsfs for gs://)."""
    from torch.utils.tensorboard import SummaryWriter

    try:
        return SummaryWriter(path)
    except (ImportError, ValueError, OSError) as exc:
        log.warning("no TensorBoard event files in %s (%s: %s); metrics.jsonl has every row",
                    path, type(exc).__name__, exc)
        return None


class MetricsSink:
    """metrics.jsonl always; TensorBoard where it can write (`tensorboard_writer`); MLflow when MLFLOW_TRACKING_URI is set;
    a progress line per train/validation row when `max_steps` is given, logged at INFO: in a Ray
    Train worker the root logger goes to the console (which Ray forwards to the driver and to
    `ray job logs`) and to Train's worker log file. Not `print`: Ray Train patches it into the same
    logger and, as Ray's worker wraps sys.stdout, also prints it, so every line came out twice."""

    def __init__(self, run_dir: str, run_name: str, enabled: bool, max_steps: int | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.tb = None
        self.mlflow = None
        if not enabled:
            return
        self.tb = tensorboard_writer(storage.join(run_dir, "tensorboard"))
        if os.environ.get(tracking.URI_VAR):
            # the driver checked this store before Ray started (cluster.tracking.check_tracking); a
            # refusal here (a worker with another environment) fails with the driver's message
            self.mlflow = tracking.start_mlflow_run(run_name)
        self._remote = storage.is_uri(run_dir)
        self._rows = storage.Appender(storage.join(run_dir, "metrics.jsonl"), every_s=REMOTE_FLUSH_S)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._rows.write(json.dumps(row) + "\n")
        step = int(row["step"])
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
            if not self._remote:  # on an object store a flush rewrites the event file: see flush()
                self.tb.flush()
        if self.mlflow:
            self.mlflow.log_metrics(numeric, step=step)
        line = progress_line(row, self.max_steps) if self.max_steps else None
        if line:
            log.info(line)

    def flush(self) -> None:
        """Rows held for an object store written now: before each checkpoint, so that a run resumed
        from it has every row up to it. Otherwise they go every REMOTE_FLUSH_S (TensorBoard's own
        writer: every 2 minutes)."""
        if not self.enabled:
            return
        self._rows.flush()
        if self.tb and self._remote:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._rows.flush()
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run()
