"""`make gpu-check` without a GPU, and the BENCHMARKS.md section it writes from its results."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import gpu_check, gpu_report

REPO = Path(__file__).resolve().parents[2]
RESULTS = {"device": "NVIDIA H100 80GB HBM3", "date": "2027-01-02", "steps": {
    "1 throughput": {"ray_train_tokens_per_s": 410000.0, "plain_tokens_per_s": 420000.0, "ratio": 0.976,
                     "ratio_goal": 0.97, "mfu": 0.47, "mfu_goal": 0.45},
    "4 serve": {"gpu-gpt": "cuda/bfloat16", "batching_speedup": 3.4}}}


def test_without_a_gpu_the_check_stops_at_once_naming_what_it_needs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    assert "needs one CUDA GPU" in str(stop.value.code) and "--rehearse" in str(stop.value.code)


def test_the_gpu_section_and_row_are_replaced_and_the_rest_of_the_page_kept(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    shutil.copy(REPO / "BENCHMARKS.md", page)
    before = page.read_text()
    gpu_report.update_benchmarks(RESULTS, str(page))
    after = page.read_text()
    row = next(line for line in after.splitlines() if line.startswith("| [GPU](#gpu)"))
    assert "ratio 0.976; MFU 47.0%" in row and "| yes |" in row and "NVIDIA H100" in row
    section = after[after.index("## GPU"):]
    assert "Last run: NVIDIA H100 80GB HBM3, 2027-01-02" in section and "| 4 serve | gpu-gpt | cuda/bfloat16 |" in section
    # everything before the GPU section, but its summary row, is as it was
    head = [line for line in before[:before.index("## GPU")].splitlines() if not line.startswith("| [GPU]")]
    assert [line for line in after[:after.index("## GPU")].splitlines() if not line.startswith("| [GPU]")] == head
    gpu_report.update_benchmarks(RESULTS, str(page))  # a second run replaces, never appends
    assert page.read_text() == after
