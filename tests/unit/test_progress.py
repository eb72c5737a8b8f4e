"""The training loop's console line per metrics row (cluster.train.progress_line), without Ray."""

from __future__ import annotations

import logging

from cluster.train.sink import MetricsSink, progress_line


def _train_row(**extra):
    return {"step": 40, "epoch": 1, "split": "train", "train_loss": 2.34567, "train_perplexity": 10.4,
            "lr": 0.0003, "grad_norm": 0.8123, "tokens_per_s_worker": 6000.0, "tokens_per_s": 12000.4,
            "data_wait_fraction": 0.0123, "elapsed_s": 75.2, "eta_s": 3725.0, "tokens_seen": 1, "time": 0.0,
            **extra}


def test_a_train_row_reads_as_one_line_with_the_run_s_progress():
    line = progress_line(_train_row(), 200)
    assert line == ("step 40/200 epoch 1 | loss 2.3457 | lr 3.00e-04 | grad norm 0.812 | 12,000 tokens/s | "
                    "data wait 1.2% | 1m15s elapsed, eta 1h02m")
    assert "| mfu 41.0% |" in progress_line(_train_row(mfu=0.41), 200)


def test_validation_and_resume_rows_and_nothing_else():
    val = progress_line({"step": 50, "epoch": 0, "split": "validation", "val_loss": 1.5, "val_bits_per_byte": 0.75},
                        50)
    assert val == "step 50/50 validation | loss 1.5 | bits_per_byte 0.75"
    assert progress_line({"step": 10, "epoch": 0, "split": "resume", "batches_in_epoch": 20, "time": 1.0}, 50) == \
        "resumed at step 10 (epoch 0, micro-batch 20 of that epoch)"
    assert progress_line({"step": 3, "split": "error", "nonfinite_loss": True}, 50) is None


def test_the_sink_logs_progress_only_when_given_the_run_length(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cluster.train.sink")
    for max_steps in (None, 200):
        sink = MetricsSink(str(tmp_path), "t", enabled=True, max_steps=max_steps)
        sink.log(_train_row())
        sink.close()
    assert [r.getMessage()[:21] for r in caplog.records] == ["step 40/200 epoch 1 |"]
    assert (tmp_path / "metrics.jsonl").read_text().count('"split": "train"') == 2
