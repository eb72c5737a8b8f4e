"""jobs.evaluate's logic without Ray: what a model reference resolves to, which objective an
architecture is scored with, label checks, and one scoring actor run in-process on tiny models."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from cluster import objectives, storage
from cluster.config import ConfigError, load_config
from cluster.data import task_prep, tasks
from cluster.errors import JobError
from cluster.stages import evaluate, scoring
from serve import tiny

# ---------------------------------------------------------------- config


def test_exactly_one_of_corpus_and_data():
    with pytest.raises(ConfigError, match="exactly one of corpus"):
        load_config(evaluate.EvaluateConfig, None, ["model=m"])
    with pytest.raises(ConfigError, match="exactly one of corpus"):
        load_config(evaluate.EvaluateConfig, None, ["model=m", "corpus=c", "data.kind=synthetic"])
    assert load_config(evaluate.EvaluateConfig, None, ["model=m", "corpus=c"]).split == "validation"


def test_a_held_out_file_alone_is_enough_data():
    cfg = load_config(evaluate.EvaluateConfig, None, ["model=m", "data.kind=files", "data.validation=test.csv"])
    assert cfg.data.validation == ["test.csv"] and cfg.data.train == []
    with pytest.raises(ConfigError, match="data.validation"):
        load_config(evaluate.EvaluateConfig, None, ["model=m", "data.kind=files"])


def test_no_train_files_means_no_train_split_to_score():
    data = evaluate.EvalData(kind="files", validation=["test.csv"])
    with pytest.raises(tasks.TaskDataError, match="data.train: no files"):
        tasks.load_split(data, "train")


# ---------------------------------------------------------------- what a reference names


def _run(root, job, name, best=None, final=None):
    d = os.path.join(root, job, name)
    os.makedirs(d, exist_ok=True)
    summary = {"best": {"checkpoint": best} if best else None, "final": {"checkpoint": final}}
    storage.write_json_atomic(os.path.join(d, "summary.json"), summary)
    return d


def _checkpoint(path):
    os.makedirs(path)
    open(os.path.join(path, "config.json"), "w").write("{}")
    return path


def test_a_run_name_or_folder_stands_for_its_best_checkpoint(tmp_path):
    root = str(tmp_path)
    best = _checkpoint(os.path.join(root, "finetune", "cls", "checkpoint_0000050"))
    run = _run(root, "finetune", "cls", best=best, final=best + "-final")
    assert evaluate.resolve_model("cls", root) == best
    assert evaluate.resolve_model(run, root) == best
    assert evaluate.resolve_model(best, root) == best  # a checkpoint folder is itself
    final_only = _run(root, "pretrain", "gpt", final="/x/checkpoint_0000080")
    assert evaluate.resolve_model("gpt", root) == "/x/checkpoint_0000080"
    assert evaluate.resolve_model(final_only, root) == "/x/checkpoint_0000080"


def test_a_registry_name_a_hub_id_and_what_is_refused(tmp_path):
    root = str(tmp_path)
    entry = _checkpoint(os.path.join(root, "registry", "topic"))
    open(os.path.join(entry, "model.json"), "w").write("{}")
    assert evaluate.resolve_model("topic", root) == entry
    assert evaluate.resolve_model("org/some-model", root) == "org/some-model"  # left to the hub lookup
    assert evaluate.resolve_model("bert-base-uncased", root) == "bert-base-uncased"
    with pytest.raises(JobError, match="'./gone' does not exist"):
        evaluate.resolve_model("./gone", root)
    sweep_best = _checkpoint(os.path.join(root, "tune", "topic", "trial", "checkpoint_0000030"))
    _run(root, "tune", "topic", best=sweep_best)
    with pytest.raises(JobError, match="names run .* and registry model .* published from another checkpoint"):
        evaluate.resolve_model("topic", root)
    # a sweep that published its best under its own name: one model, whichever folder
    storage.write_json_atomic(os.path.join(entry, "model.json"), {"source_checkpoint": sweep_best})
    assert evaluate.resolve_model("topic", root) == sweep_best
    os.makedirs(os.path.join(root, "finetune", "half"))
    with pytest.raises(JobError, match="has not finished"):
        evaluate.resolve_model("half", root)
    _run(root, "finetune", "empty")
    with pytest.raises(JobError, match="finished without a checkpoint"):
        evaluate.resolve_model("empty", root)


# ---------------------------------------------------------------- architectures and labels


@pytest.mark.parametrize("arch, task", [("BertForSequenceClassification", "classification"),
                                        ("LlamaForTokenClassification", "tagging"),
                                        ("GPT2LMHeadModel", "completion"), ("LlamaForCausalLM", "completion")])
def test_the_task_follows_the_head(arch, task):
    assert evaluate.task_of(arch, "m") == task


def test_a_model_scored_on_the_wrong_kind_of_data_is_told_which_kind():
    with pytest.raises(JobError, match="no task head: score it on a prepared corpus"):
        evaluate.task_of("BertForPreTraining", "m")
    with pytest.raises(JobError, match="a task model: score it on labelled data"):
        evaluate.lm_kind("RobertaForSequenceClassification", "m")
    assert evaluate.lm_kind("GPT2LMHeadModel", "m") == "clm"
    assert [evaluate.lm_kind(a, "m") for a in ("AlbertForPreTraining", "RobertaForMaskedLM")] == ["mlm", "mlm"]
    with pytest.raises(JobError, match="names no architecture"):
        evaluate.architecture({"model_type": "bert"}, "m")


def test_labels_come_in_output_order_and_must_cover_every_output():
    assert evaluate.model_labels({"id2label": {"1": "pos", "0": "neg"}}, "m") == ["neg", "pos"]
    with pytest.raises(JobError, match="does not give a label for each output"):
        evaluate.model_labels({"id2label": {"0": "neg", "2": "pos"}}, "m")
    with pytest.raises(JobError, match="does not give a label"):
        evaluate.model_labels({}, "m")


def test_labels_the_model_cannot_predict_are_named():
    stats = task_prep.SplitStats(labels=__import__("collections").Counter({"pos": 3, "meh": 1}))
    cfg = tasks.TaskData()
    msg = evaluate.unknown_labels("classification", cfg, stats, ["neg", "pos"], "validation")
    assert "data.label_column" in msg and "['meh']" in msg and "['neg', 'pos']" in msg
    assert evaluate.unknown_labels("classification", cfg, stats, ["meh", "neg", "pos"], "validation") is None


def test_batches_add_up_with_their_samples():
    rows = [{"sums": json.dumps({"nats": 2.0, "tokens": 4.0}), "samples": json.dumps([["a", "b"]]), "rows": 2},
            {"sums": json.dumps({"nats": 1.0, "tokens": 1.0}), "samples": "[]", "rows": 1}]
    assert scoring.add_sums(rows) == ({"nats": 3.0, "tokens": 5.0}, [("a", "b")], 3)


def test_a_batch_seed_depends_on_its_rows_only():
    a = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]])}
    b = {"input_ids": np.array([[1, 2, 4], [4, 5, 6]])}
    assert scoring.batch_seed(0, a) == scoring.batch_seed(0, {"input_ids": a["input_ids"].copy()})
    assert scoring.batch_seed(0, a) != scoring.batch_seed(0, b) and scoring.batch_seed(0, a) != scoring.batch_seed(1, a)
    assert len(scoring.batch_seed(0, a)) == 4  # the shape the masking generator takes


# ---------------------------------------------------------------- one scoring actor, in-process


def _spec(kind: str, **extra) -> dict:
    return {"kind": kind, "seed": 0, "precision": "fp32", "use_gpu": False, "threads": 1, "sample_cap": 0,
            "max_new_tokens": 4, **extra}


def test_a_causal_lm_batch_scores_the_next_token_loss(tmp_path):
    path = tiny.save_gpt(str(tmp_path / "gpt"), max_len=32)
    spec = _spec("clm", bytes_per_token=3.0, architecture="GPT2LMHeadModel")
    scorer = scoring.Scorer(path, spec)
    ids = np.random.default_rng(0).integers(0, 300, size=(3, 16)).astype(np.int32)
    out = scorer({"input_ids": ids})
    sums = json.loads(out["sums"][0])
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                             torch.from_numpy(ids[:, 1:].astype(np.int64)).reshape(-1), reduction="sum")
    assert sums["tokens"] == 3 * 15 and int(out["rows"][0]) == 3
    assert sums["nats"] == pytest.approx(float(want), rel=1e-5)
    metrics = objectives.build(spec, None).summarize(sums)
    assert metrics["bits_per_byte"] == pytest.approx(sums["nats"] / 45 / math.log(2) / 3.0)


def test_a_classifier_batch_counts_what_it_gets_right(tmp_path):
    path = tiny.save_bert(str(tmp_path / "cls"), "classification")
    spec = _spec("classification", pair=False, token_types=True, labels=tiny.CLASS_LABELS,
                 architecture="BertForSequenceClassification")
    tok = scoring.model_tokenizer(path, spec)
    spec["pad_id"] = tok.pad_token_id
    texts = tiny.sentences(12, seed=3)
    labels = ["negative", "positive"] * 6
    batch = task_prep._tokenize(pd.DataFrame({"text": texts, "label": labels}), "classification",
                            json.dumps(task_prep.tokenizer_files(tok)), tasks.TaskData().model_dump(),
                            {"negative": 0, "positive": 1}, True)
    out = scoring.Scorer(path, spec)({k: np.array(v, dtype=object) if isinstance(v, list) else v for k, v in batch.items()})
    sums = json.loads(out["sums"][0])
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        pred = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    right = sum(p == (0 if y == "negative" else 1) for p, y in zip(pred, labels, strict=True))
    metrics = objectives.build(spec, tok).summarize(sums)
    assert metrics["accuracy"] == pytest.approx(right / 12)
