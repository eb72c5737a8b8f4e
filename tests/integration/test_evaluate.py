"""jobs.evaluate on the shared local Ray: a pool of scoring actors gets the numbers transformers
computes on its own, for a pretrained GPT on its corpus and a classifier on a held-out CSV; encoder
metrics do not depend on the number of replicas; labels the model lacks are refused."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from cluster.checkpoints import prepare_tokenizer, resolve_checkpoint
from cluster.config import load_config
from cluster.data import synthetic_tasks as synthetic
from cluster.stages.evaluate import EvaluateConfig
from jobs import evaluate as evaluate_job
from tests.conftest import PYTHON, REPO, subprocess_env


def run(name: str, *sets: str) -> dict:
    cfg = load_config(EvaluateConfig, None, [f"name={name}", "scaling.threads_per_worker=1", *sets])
    with open(evaluate_job.run(cfg)) as f:
        return json.load(f)


def test_a_pretrained_gpt_scores_what_transformers_computes(gpt_base, gpt_corpus):
    s = run("t-eval-gpt", f"model={gpt_base}", "corpus=t-gpt", "scaling.workers=2", "batch_size=16")
    checkpoint = resolve_checkpoint(gpt_base)
    assert s["checkpoint"] == checkpoint and s["architecture"] == "GPT2LMHeadModel"
    assert s["rows"] == gpt_corpus.split_info("validation")["rows"]
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    rows = np.concatenate([np.stack(pq.read_table(p, columns=["input_ids"]).column(0).to_numpy(zero_copy_only=False))
                           for p in gpt_corpus.shard_paths("validation")]).astype(np.int64)
    nats = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            ids = torch.from_numpy(rows[i : i + 64])
            logits = model(ids).logits
            nats += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                            ids[:, 1:].reshape(-1), reduction="sum"))
    loss = nats / (rows.shape[0] * (rows.shape[1] - 1))
    m = s["metrics"]
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(loss / math.log(2) / gpt_corpus.bytes_per_token("validation"), rel=1e-5)


@pytest.fixture(scope="module")
def topic_classifier(gpt_base, tmp_path_factory):
    """The pretrained GPT with an untrained 4-topic head, saved as a fine-tune would save it."""
    from transformers import GPT2ForSequenceClassification

    labels = ["finance", "science", "sports", "travel"]
    base = resolve_checkpoint(gpt_base)
    path = str(tmp_path_factory.mktemp("classifier") / "ckpt")
    torch.manual_seed(0)
    tok = prepare_tokenizer(base, "classification", pair=False)
    model = GPT2ForSequenceClassification.from_pretrained(base, num_labels=4, id2label=dict(enumerate(labels)),
                                                          label2id={v: k for k, v in enumerate(labels)})
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_classifier_on_a_held_out_csv_scores_what_transformers_predicts(topic_classifier, tmp_path):
    rows = synthetic.topic_classification(40, seed=5)
    pd.DataFrame(rows).to_csv(tmp_path / "test.csv", index=False)
    s = run("t-eval-cls", f"model={topic_classifier}", "data.kind=files", f"data.validation={tmp_path / 'test.csv'}",
            "batch_size=8")
    assert s["task"] == "classification" and s["rows"] == 40 and s["data"]["kept"] == 40
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(topic_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(topic_classifier).eval()
    with torch.no_grad():
        pred = [model.config.id2label[int(model(**tok(r["text"], truncation=True, max_length=128,
                                                       return_tensors="pt")).logits.argmax(-1))] for r in rows]
    right = sum(p == r["label"] for p, r in zip(pred, rows, strict=True))
    assert s["metrics"]["accuracy"] == pytest.approx(right / 40)


def test_labels_the_classifier_lacks_are_refused_with_no_summary(topic_classifier, tmp_path, capsys):
    pd.DataFrame({"text": ["a b c", "d e f"], "label": ["finance", "cooking"]}).to_csv(tmp_path / "bad.csv", index=False)
    rc = evaluate_job.main(["--set", "name=t-eval-bad", "--set", f"model={topic_classifier}", "--set", "data.kind=files",
                            "--set", f"data.validation={tmp_path / 'bad.csv'}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "labels ['cooking'] the model does not predict" in err, err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "evaluate", "t-eval-bad", "summary.json"))


def test_encoder_metrics_do_not_depend_on_the_number_of_replicas(bert_base, bert_corpus):
    # Masks and NSP pairs are drawn per batch: the batches must be the same whichever replica, and
    # however many, score them. (Whether the second replica gets a batch at all depends on how fast
    # it starts, so the test does not ask.)
    one = run("t-eval-bert1", f"model={bert_base}", "corpus=t-bert", "batch_size=8")
    two = run("t-eval-bert2", f"model={bert_base}", "corpus=t-bert", "batch_size=8", "scaling.workers=2")
    assert one["rows"] == two["rows"] == bert_corpus.split_info("validation")["rows"]
    assert one["replicas_used"] == 1 and two["replicas_used"] in (1, 2)
    assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"} <= set(one["metrics"])
    assert one["metrics"]["mlm_loss"] == pytest.approx(two["metrics"]["mlm_loss"], rel=1e-6)
    assert one["metrics"]["nsp_accuracy"] == two["metrics"]["nsp_accuracy"]


def test_replicas_that_take_every_cpu_still_get_the_rows(topic_classifier, tmp_path, ray_session):
    # Regression: the actors hold their CPUs from the start; with none left, the read and re-block
    # tasks waited for them and they for the rows (2 replicas on a 2-CPU `ray start` cluster hung).
    import ray

    pd.DataFrame(synthetic.topic_classification(24, seed=6)).to_csv(tmp_path / "t.csv", index=False)
    cpus = int(ray.cluster_resources()["CPU"])
    out = subprocess.run(
        [PYTHON, "-m", "jobs.evaluate", "--set", "name=t-eval-full", "--set", f"model={topic_classifier}",
         "--set", "data.kind=files", "--set", f"data.validation={tmp_path / 't.csv'}", "--set", "batch_size=4",
         "--set", f"scaling.workers={cpus}", "--set", "scaling.threads_per_worker=1"],
        capture_output=True, text=True, timeout=240, cwd=REPO, env=subprocess_env(ray_session))
    assert out.returncode == 0, out.stderr[-2000:]
    with open(out.stdout.strip().splitlines()[-1]) as f:
        assert json.load(f)["rows"] == 24
