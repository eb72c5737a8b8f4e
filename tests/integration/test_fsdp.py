"""FSDP2 (`scaling.strategy: fsdp`) on two CPU workers with gloo, on the shared local Ray: it trains
as DDP does, its checkpoint loads with transformers alone, a killed worker resumes from the sharded
optimizer state, and a checkpoint written by two sharded workers resumes on one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

import pytest

from jobs import pretrain as pretrain_job
from tests.conftest import PYTHON
from tests.integration.test_pretrain import _console, _submit, _wait_for, config, metrics, run_dir, summary

# The same run for both strategies: two workers, a checkpoint every 10 steps.
SETS = ["scaling.num_workers=2", "train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=10",
        "train.log_every=5"]


@pytest.fixture(scope="module")
def ddp_and_fsdp(gpt_corpus):
    pretrain_job.run(config("t-ddp40", *SETS))
    pretrain_job.run(config("t-fsdp40", *SETS, "scaling.strategy=fsdp"))
    return summary("t-ddp40"), summary("t-fsdp40")


def test_fsdp_trains_as_ddp_does(ddp_and_fsdp):
    ddp, fsdp = ddp_and_fsdp
    first, last = (metrics("t-fsdp40", "validation")[i]["val_loss"] for i in (0, -1))
    assert last < first - 0.3  # it learns
    ddp_loss, fsdp_loss = ddp["final"]["metrics"]["val_loss"], fsdp["final"]["metrics"]["val_loss"]
    assert abs(fsdp_loss - ddp_loss) / ddp_loss < 0.02
    assert {w["rank"] for w in fsdp["workers"]} == {0, 1}


def test_a_sharded_checkpoint_is_whole_and_loads_with_transformers_alone(ddp_and_fsdp):
    path = ddp_and_fsdp[1]["final"]["checkpoint"]
    # every rank wrote its optimizer shard into the one checkpoint folder
    shards = sorted(os.listdir(os.path.join(path, "train_state", "optimizer")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["GPT2LMHeadModel"]
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({path!r})
        model = AutoModelForCausalLM.from_pretrained({path!r})
        ids = tok("The", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]
        assert not any(m == "cluster" or m.startswith(("cluster.", "jobs", "raylm")) for m in sys.modules)
        print("GENERATED", repr(tok.decode(out[0])))
    """)
    out = subprocess.run([PYTHON, "-I", "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "GENERATED" in out.stdout


def test_a_killed_fsdp_worker_resumes_and_the_run_ends_where_an_uninterrupted_one_does(ddp_and_fsdp, ray_session):
    driver = _submit(config("t-fsdp-kill", *SETS, "scaling.strategy=fsdp", "max_failures=2", "train.log_every=1"),
                     ray_session)
    log = os.path.join(run_dir("t-fsdp-kill"), "metrics.jsonl")

    def rows() -> list[dict]:
        return [json.loads(line) for line in open(log)] if os.path.exists(log) else []

    try:
        _wait_for(lambda: any(r.get("split") == "train" and r["step"] >= 13 for r in rows()), 240, "step 13")
        with open(os.path.join(run_dir("t-fsdp-kill"), "workers", "rank-1.json")) as f:
            os.kill(json.load(f)["pid"], signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, _console("t-fsdp-kill")[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert [r["step"] for r in rows() if r.get("split") == "resume"] == [10]
    resumed = summary("t-fsdp-kill")["final"]["metrics"]["val_loss"]
    reference = ddp_and_fsdp[1]["final"]["metrics"]["val_loss"]
    assert abs(resumed - reference) / reference < 0.02


def test_a_checkpoint_of_two_sharded_workers_resumes_on_one(ddp_and_fsdp):
    """Runs last: it continues t-fsdp40 (the optimizer's shards are read back resharded)."""
    pretrain_job.run(config("t-fsdp40", *SETS, "scaling.strategy=fsdp", "scaling.num_workers=1",
                            "train.max_steps=50"))
    assert [r["step"] for r in metrics("t-fsdp40", "resume")] == [40]
    s = summary("t-fsdp40")
    assert s["final"]["metrics"]["step"] == 50
    at_40 = ddp_and_fsdp[1]["final"]["metrics"]["val_loss"]
    assert s["final"]["metrics"]["val_loss"] < at_40 * 1.02  # it went on from where it was, not from scratch
