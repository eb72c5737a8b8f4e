"""The pipeline with its storage in S3 (`RAYLM_STORAGE=s3://...`, moto's S3 server: tests/conftest.py
s3_env): prepare -> pretrain -> fine-tune the pretrain run by name -> evaluate the fine-tune by name.

The jobs run in a subprocess that starts its own embedded Ray, as a laptop user's would: Ray's
workers take the AWS settings from the environment Ray starts in, which the shared test Ray started
without. Before this test, pretraining on a corpus in S3 failed at its first worker (the tokenizer
copy), and summaries named checkpoints without their s3://."""

from __future__ import annotations

import json
import subprocess
import uuid

from cluster import storage
from tests.conftest import PYTHON, REPO, S3_BUCKET, subprocess_env

PIPELINE = """
import sys
from jobs import evaluate, finetune, prepare, pretrain

steps = [
    (prepare, ["--config", "configs/prepare-synthetic.yaml", "--set", "name=c", "--set", "sources.0.num_docs=1500",
               "--set", "output.shard_mb=0.05", "--set", "split.validation_fraction=0.1"]),
    (pretrain, ["--config", "configs/gpt-tiny.yaml", "--set", "name=p", "--set", "corpus=c",
                "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
                "--set", "train.eval_batches=2", "--set", "train.log_every=4", "--set", "optim.warmup_steps=2",
                "--set", "train.trace_data=true"]),
    (finetune, ["--config", "configs/finetune-topic-tiny.yaml", "--set", "name=f", "--set", "model.checkpoint=p",
                "--set", "data.train_examples=200", "--set", "data.validation_examples=64",
                "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3",
                "--set", "train.eval_batches=2", "--set", "optim.warmup_steps=2"]),
    (evaluate, ["--config", "configs/evaluate-topic-tiny.yaml", "--set", "name=e", "--set", "model=f",
                "--set", "data.validation_examples=64"]),
]
for job, args in steps:
    rc = job.main(args)
    if rc:
        sys.exit(rc)
"""


def test_the_pipeline_runs_with_its_storage_in_s3(s3_env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root = f"s3://{S3_BUCKET}/pipeline-{uuid.uuid4().hex[:8]}"
    env = {**subprocess_env(), **s3_env, "RAYLM_STORAGE": root, "RAYLM_DASHBOARD": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([PYTHON, "-c", PIPELINE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == storage.join(root, "evaluate", "e", "summary.json")

    pre = storage.read_json(storage.join(root, "pretrain", "p", "summary.json"))
    assert pre["final"]["checkpoint"] == storage.join(root, "pretrain", "p", "checkpoint_0000008")
    assert pre["best"]["checkpoint"].startswith(storage.join(root, "pretrain", "p", "checkpoint_"))
    assert storage.exists(storage.join(pre["best"]["checkpoint"], "model.safetensors"))
    assert [w["rank"] for w in pre["workers"]] == [0]
    rows = [json.loads(line) for line in storage.read_text(pre["metrics"]).splitlines()]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [4, 8]
    trace = storage.read_text(storage.join(root, "pretrain", "p", "data_trace", "rank-0.jsonl")).splitlines()
    assert [json.loads(line)["batch"] for line in trace] == list(range(8))

    fine = storage.read_json(storage.join(root, "finetune", "f", "summary.json"))
    assert fine["base_checkpoint"] == pre["best"]["checkpoint"]
    best = fine["best"]["checkpoint"]
    assert best.startswith(storage.join(root, "finetune", "f", "checkpoint_"))
    # a Hugging Face folder, loadable without raylm once copied out of the bucket
    fs, path = storage.filesystem(best)
    import pyarrow.fs as pafs

    pafs.copy_files(path, str(tmp_path / "ckpt"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    assert model.config.num_labels == 4

    ev = storage.read_json(storage.join(root, "evaluate", "e", "summary.json"))
    assert ev["checkpoint"] == best and ev["rows"] == 64
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
