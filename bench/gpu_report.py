"""BENCHMARKS.md's GPU section and summary row, written from `make gpu-check`'s results
(bench/results/gpu-check.json), so the page shows the figures of the last GPU run and no others."""

from __future__ import annotations

import re
from typing import Any


def section(results: dict[str, Any]) -> str:
    """The GPU section's text: the command, the GPU and date, one row per figure."""
    lines = ["## GPU", "", "```bash", "make gpu-check     # python -m bench.gpu_check: one CUDA GPU, ~8 minutes", "```",
             "", f"Last run: {results['device']}, {results['date']} (figures in `bench/results/gpu-check.json`).",
             "", "| step | figure | value |", "| --- | --- | --- |"]
    for step, figures in results["steps"].items():
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {step} | {key} | {shown} |")
    lines += ["", "**What limits it.** One GPU: FSDP shards over a single rank, so step 2 checks its code path",
              "and numerics, not its scaling; the serve figures share the GPU between two replicas."]
    return "\n".join(lines) + "\n"


def summary_row(results: dict[str, Any]) -> str:
    throughput = results["steps"].get("1 throughput", {})
    ratio, mfu = throughput.get("ratio"), throughput.get("mfu")
    figure = f"ratio {ratio:.3f}" if ratio is not None else "-"
    if mfu is not None:
        figure += f"; MFU {mfu * 100:.1f}%"
    met = "yes" if ratio is not None and ratio >= 0.97 and (mfu is None or mfu >= 0.45) else "no"
    return (f"| [GPU](#gpu) (MFU, Ray Train vs plain loop) | `make gpu-check` | plain PyTorch loop, same model and "
            f"batches | {figure} | ratio >= 0.97, MFU >= 45% (H100) | {met} | {results['date']} | "
            f"{results['device']} |")


def update_benchmarks(results: dict[str, Any], path: str) -> None:
    """Replace the page's GPU section (to the next `## ` heading or the end) and its GPU summary row."""
    with open(path) as f:
        page = f.read()
    page = re.sub(r"^\| \[GPU\]\(#gpu\).*$", summary_row(results).replace("\\", "\\\\"), page, count=1, flags=re.M)
    page = re.sub(r"^## GPU\n.*?(?=^## |\Z)", section(results).replace("\\", "\\\\") + "\n", page, count=1,
                  flags=re.M | re.S)
    with open(path, "w") as f:
        f.write(page.rstrip("\n") + "\n")
