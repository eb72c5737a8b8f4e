"""The pipeline with its storage and its data in S3 (`RAYLM_STORAGE=s3://...`, moto's S3 server:
tests/conftest.py s3_env): prepare raw files in the bucket -> a re-prepare of that corpus that fails
after writing its shards -> pretrain on the corpus kept -> fine-tune the pretrain run by name on
labelled files in the bucket -> evaluate the fine-tune by name on a file there.

The jobs run in a subprocess that starts its own embedded Ray, as a laptop user's would: Ray's
workers take the AWS settings from the environment Ray starts in, which the shared test Ray started
without. Before this test, pretraining on a corpus in S3 failed at its first worker (the tokenizer
copy), and summaries named checkpoints without their s3://; source and task files had to be local."""

from __future__ import annotations

import json
import subprocess
import uuid

from cluster import storage
from cluster.data.corpus import Corpus
from tests.conftest import PYTHON, REPO, S3_BUCKET, subprocess_env

PIPELINE = """
import os
import sys
from cluster.stages import prepare as stage
from jobs import evaluate, finetune, prepare, pretrain

raw, local_raw, topic = sys.argv[1:4]


class failing_reprepare:  # jobs.prepare with the storage failing after the new shards are written: exits 1
    @staticmethod
    def main(args):
        def fail(local, dest):
            raise PermissionError(f"injected: cannot write '{dest}'")

        real, stage._upload_tokenizer = stage._upload_tokenizer, fail
        try:
            return 0 if prepare.main(args) == 1 else 1
        finally:
            stage._upload_tokenizer = real


corpus = ["--config", "configs/prepare-synthetic.yaml", "--set", "sources.0.part_mb=0.1",
          "--set", "output.shard_mb=0.05", "--set", "split.validation_fraction=0.1"]
steps = [
    (prepare, [raw, "--name", "c", *corpus]),
    (failing_reprepare, [local_raw, "--name", "c", *corpus, "--set", "split.seed=1"]),
    (prepare, [local_raw, "--name", "c-local", *corpus]),
    (prepare, [local_raw, "--name", "c-reuse", *corpus, "--set", f"tokenizer.path={os.environ['RAYLM_STORAGE']}/prepare/c/tokenizer"]),
    (pretrain, ["--config", "configs/gpt-tiny.yaml", "--set", "name=p", "--set", "corpus=c",
                "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
                "--set", "train.eval_batches=2", "--set", "train.log_every=4", "--set", "optim.warmup_steps=2",
                "--set", "train.trace_data=true"]),
    (finetune, ["--config", "configs/finetune-topic-tiny.yaml", "--set", "name=f", "--set", "model.checkpoint=p",
                "--set", "data.kind=files", "--set", f"data.train={topic}/train.jsonl",
                "--set", f"data.validation={topic}/validation.jsonl",
                "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3",
                "--set", "train.eval_batches=2", "--set", "optim.warmup_steps=2"]),
    (evaluate, ["--config", "configs/evaluate-topic-tiny.yaml", "--set", "name=e", "--set", "model=f",
                "--set", "data.kind=files", "--set", f"data.validation={topic}/valid*.jsonl"]),
]
for job, args in steps:
    rc = job.main(args)
    if rc:
        sys.exit(rc)
"""


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _upload_data(root: str, local: str) -> None:
    """Raw text (a JSONL file read in several byte-range parts, and a gzipped one), the same files
    in a local folder, and labelled topic rows; all from the synthetic generator."""
    import gzip

    from cluster.data import synthetic, synthetic_tasks

    docs = [{"text": synthetic.document(0, i).text} for i in range(1500)]
    files = {"raw/docs.jsonl": _jsonl(docs[:1200]), "raw/more/docs.jsonl.gz": gzip.compress(_jsonl(docs[1200:]))}
    for rel, data in files.items():
        storage.write_bytes_atomic(storage.join(root, rel), data)
        storage.write_bytes_atomic(storage.join(local, rel), data)
    storage.write_bytes_atomic(storage.join(root, "topic", "train.jsonl"), _jsonl(synthetic_tasks.topic_classification(200)))
    storage.write_bytes_atomic(storage.join(root, "topic", "validation.jsonl"),
                               _jsonl(synthetic_tasks.topic_classification(64, seed=7)))


def test_the_pipeline_runs_with_its_storage_and_data_in_s3(s3_env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    root = f"s3://{S3_BUCKET}/pipeline-{uuid.uuid4().hex[:8]}"
    _upload_data(root, str(tmp_path / "data"))
    env = {**subprocess_env(), **s3_env, "RAYLM_STORAGE": root, "RAYLM_DASHBOARD": "0"}
    env.pop("RAY_ADDRESS", None)
    args = [storage.join(root, "raw"), str(tmp_path / "data" / "raw"), storage.join(root, "topic")]
    proc = subprocess.run([PYTHON, "-c", PIPELINE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == storage.join(root, "evaluate", "e", "summary.json")

    # the failed re-prepare of c left c as it was (it is the corpus pretraining read) and nothing of its own
    assert "injected: cannot write" in proc.stderr
    prepared = storage.join(root, "prepare")
    corpora = {name: Corpus.open(storage.join(prepared, name)) for name in ("c", "c-local", "c-reuse")}
    assert [e for e in storage.listdir(prepared) if e.startswith(".c.")] == [storage.basename(corpora["c"].path)]
    assert storage.listdir(storage.join(prepared, "c")) == ["current.json", "summary.json"]
    # the corpus read from the bucket is the one read from the local copy, shard for shard
    manifests = [corpora[name].manifest for name in ("c", "c-local")]
    assert manifests[0]["sources"][0]["paths"] == [storage.join(root, "raw")]
    assert manifests[0]["documents"] == manifests[1]["documents"] and manifests[0]["documents"]["in"] == 1500
    assert manifests[0]["splits"] == manifests[1]["splits"]
    assert manifests[0]["tokenizer"]["hash"] == manifests[1]["tokenizer"]["hash"]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    # ... and its tokenizer, in the bucket, is reused by a third (same tokens, same split)
    reused = corpora["c-reuse"].manifest
    assert reused["tokenizer"]["hash"] == manifests[0]["tokenizer"]["hash"]
    assert {k: v["tokens"] for k, v in reused["splits"].items()} == {k: v["tokens"] for k, v in manifests[0]["splits"].items()}

    pre = storage.read_json(storage.join(root, "pretrain", "p", "summary.json"))
    assert pre["corpus"] == corpora["c"].path  # the corpus the failed re-prepare kept
    assert pre["final"]["checkpoint"] == storage.join(root, "pretrain", "p", "checkpoint_0000008")
    assert pre["best"]["checkpoint"].startswith(storage.join(root, "pretrain", "p", "checkpoint_"))
    assert storage.exists(storage.join(pre["best"]["checkpoint"], "model.safetensors"))
    assert [w["rank"] for w in pre["workers"]] == [0]
    rows = [json.loads(line) for line in storage.read_text(pre["metrics"]).splitlines()]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [4, 8]
    trace = storage.read_text(storage.join(root, "pretrain", "p", "data_trace", "rank-0.jsonl")).splitlines()
    assert [json.loads(line)["batch"] for line in trace] == list(range(8))
    assert [n for n in storage.listdir(storage.join(root, "pretrain", "p", "tensorboard"))
            if n.startswith("events.out.tfevents.")]

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

    assert fine["data"]["validation_from"] == "files"
    assert (fine["data"]["train"]["rows"], fine["data"]["validation"]["rows"]) == (200, 64)
    ev = storage.read_json(storage.join(root, "evaluate", "e", "summary.json"))
    assert ev["checkpoint"] == best and ev["rows"] == 64
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
