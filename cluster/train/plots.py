"""Loss / learning-rate curves from metrics.jsonl, written as a PNG at the end of a run."""

from __future__ import annotations

import json
import os

from cluster import storage


def plot_curves(metrics_path: str, out_path: str) -> str | None:
    if not storage.exists(metrics_path):
        return None
    rows = [json.loads(line) for line in storage.read_text(metrics_path).splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "validation"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    if storage.is_uri(out_path):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        storage.write_bytes_atomic(out_path, buf.getvalue())
    else:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
