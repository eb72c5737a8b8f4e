"""A finished sweep's results: one row per trial (its values as they were when its best checkpoint
was saved, untuned and best metric, steps, status), the best checkpoint of each, results.csv, the
console table and results.png.
"""

from __future__ import annotations

import csv
import io
import logging
import numbers
import os
from typing import Any

from pyarrow.fs import FileType

from cluster import registry, storage
from cluster.config import get_dotted
from tune.config import SweepConfig

log = logging.getLogger(__name__)


def trial_rows(cfg: SweepConfig, results: Any, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial: its searched values, best metric (and step), steps run, status, checkpoint."""
    metric, mode = cfg.objective
    pick = max if mode == "max" else min
    searched = [*cfg.search, *cfg.scheduler.mutations]
    rows = []
    for result in results:
        df = result.metrics_dataframe
        history = df[df[metric].notna()] if df is not None and metric in df else None
        history = _with_checkpoint_reports(history, result, metric)
        # the trial's own id: under PBT a trial cloned at its last step ends on its source's result
        own_id = df["trial_id"].iloc[0] if df is not None and "trial_id" in df and len(df) else None
        row: dict[str, Any] = {"trial_id": own_id or (result.metrics or {}).get("trial_id")
                               or os.path.basename(result.path)}
        row |= {k: (result.config or {}).get(k) for k in searched}
        start = history[history["step"] == 0] if history is not None else None
        row["untuned"] = float(start[metric].iloc[0]) if start is not None and len(start) else None
        # steps trained: the trial's own reports, or its last result when that is further on. Under PBT a
        # trial cloned from its source's final checkpoint restarts there with nothing left to train and
        # reports nothing more; Tune's last result for it is then the source's, at the final step.
        seen_steps = [(result.metrics or {}).get("step")]
        seen_steps += [frame["step"].max() for frame in (history, df) if frame is not None and "step" in frame
                       and len(frame)]
        steps = int(max([s for s in seen_steps if isinstance(s, numbers.Real) and s == s], default=0))  # numpy ints too
        if history is not None and len(history):
            best_i = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            row |= {metric: float(history.loc[best_i, metric]), "best_step": int(history.loc[best_i, "step"])}
        else:
            row |= {metric: None, "best_step": None}
        row["steps"] = steps
        stopped_early = row["steps"] < max_steps
        row["status"] = "ERROR" if result.error else ("STOPPED" if stopped_early else "DONE")
        row["checkpoint"] = best_checkpoint(result, metric, pick)
        # PBT mutates a trial's config as it goes: the values that trained the best checkpoint are
        # the ones it saved, not the trial's final ones
        trained = registry.checkpoint_config(row["checkpoint"]) if row["checkpoint"] else None
        if trained is not None:
            row |= {k: get_dotted(trained, k) for k in searched}
        rows.append(row)
    return sorted(rows, key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)))


def _with_checkpoint_reports(history: Any, result: Any, metric: str) -> Any:
    """The trial's evaluations from its result file, plus those it reported with a checkpoint that
    the file lacks. Tune re-copies result.json from the trial's storage folder when a trial restarts
    in place (PBT exploit with reused actors), over a local copy that had more lines: the file can
    end at the step before the exploit while Tune still holds the later checkpoints' reports."""
    import pandas as pd

    reports = [{"step": int(m["step"]), metric: float(m[metric])} for _, m in (result.best_checkpoints or [])
               if m.get(metric) is not None and m.get("step") is not None]
    seen = set() if history is None else set(zip(history["step"], history[metric], strict=True))
    extra = [r for r in reports if (r["step"], r[metric]) not in seen]
    if not extra:
        return history
    return pd.concat([history, pd.DataFrame(extra)], ignore_index=True) if history is not None else pd.DataFrame(extra)


def best_checkpoint(result: Any, metric: str, pick: Any) -> str | None:
    """The trial's best checkpointed path: Tune checkpoints (function trials) or the checkpoint_path
    that TuneReportCallback put in the metrics (N-worker trials)."""
    # under PBT Tune lists every checkpoint a trial saved, and PBTCheckpointPruner deleted some
    kept = [(storage.location(c.filesystem, c.path), m[metric]) for c, m in (result.best_checkpoints or [])
            if m.get(metric) is not None and c.filesystem.get_file_info(c.path).type != FileType.NotFound]
    df = result.metrics_dataframe
    if df is not None and "checkpoint_path" in df and metric in df:
        # paths inside the run's storage filesystem, as Ray gives them: no s3:// on a URI storage
        kept += [(storage.location(result.filesystem, p), v) for p, v in zip(df["checkpoint_path"], df[metric], strict=True)
                 if isinstance(p, str) and v == v and result.filesystem.get_file_info(p).type != FileType.NotFound]
    return pick(kept, key=lambda pv: pv[1])[0] if kept else None


def write_table(rows: list[dict[str, Any]], path: str) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomic(path, buf.getvalue())
    return path


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [keys] + [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)


def plot_sweep(cfg: SweepConfig, rows: list[dict[str, Any]], path: str) -> str | None:
    """The metric against each searched hyperparameter (log axis for loguniform), one panel each."""
    metric, _ = cfg.objective
    keys = [*cfg.search, *[k for k in cfg.scheduler.mutations if k not in cfg.search]]
    scored = [r for r in rows if r.get(metric) is not None]
    if not keys or not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = {**cfg.scheduler.mutations, **cfg.search}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [r[key] for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.scatter(values, [r[metric] for r in scored])
            if domains[key].kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], [r[metric] for r in scored])
            ax.set_xticks(range(len(labels)), labels)
        for r in scored:
            if r["status"] == "STOPPED":
                ax.annotate("stopped", (r[key] if numeric else sorted({str(v) for v in values}).index(str(r[key])),
                                        r[metric]), fontsize=6, alpha=0.6)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"sweep {cfg.name}: best {metric} per trial")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())
    return path
