"""jobs.finetune on the shared local Ray: a two-worker LoRA run through Ray Train, checkpoints that
transformers loads alone, the data sources, and bad input refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from cluster.checkpoints import prepare_tokenizer
from cluster.config import load_config
from cluster.data import synthetic_tasks as synthetic
from cluster.data.task_prep import prepare_data
from cluster.data.tasks import TaskData, TaskDataError
from cluster.stages.finetune import FinetuneConfig
from jobs import finetune as finetune_job
from tests.conftest import PYTHON, REPO, subprocess_env

FAST = ["train.log_every=10", "train.eval_batches=8", "scaling.threads_per_worker=1", "optim.warmup_steps=5",
        "data.train_examples=800", "data.validation_examples=160"]


def config(name: str, path: str, *sets: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, os.path.join(REPO, "configs", path), [f"name={name}", *FAST, *sets])


def summary(name: str) -> dict:
    with open(os.path.join(os.environ["RAYLM_STORAGE"], "finetune", name, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def lora_tagging_run(gpt_base):
    cfg = config("t-ft-tag", "finetune-entities-tiny.yaml", f"model.checkpoint={gpt_base}",
                 "strategy.kind=lora", "strategy.lora.rank=8", "optim.lr=1e-2", "scaling.num_workers=2",
                 "train.batch_size=8", "train.max_steps=60", "train.eval_every=30", "train.checkpoint_every=30")
    finetune_job.run(cfg)
    return summary("t-ft-tag")


def test_two_worker_lora_tagging_beats_all_o(lora_tagging_run):
    s = lora_tagging_run
    final = s["final"]["metrics"]
    assert s["baseline"]["entity_f1"] == 0.0 and s["untuned"]["val_entity_f1"] < 0.05
    assert final["val_entity_f1"] > 0.5, final
    assert final["val_token_accuracy"] > s["baseline"]["token_accuracy"]
    assert s["labels"][0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG"} <= set(s["labels"])
    workers = os.listdir(os.path.join(os.path.dirname(s["metrics"]), "workers"))
    assert sorted(workers) == ["rank-0.json", "rank-1.json"]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(s["final"]["checkpoint"]).id2label[0] == "O"
    assert final["trainable_params"] < 0.2 * _param_count(s["final"]["checkpoint"])


def test_encoder_full_finetune_tags_entities(bert_base):
    """The BERT family through the same path: a full fine-tune of the tiny pretrained encoder."""
    cfg = config("t-ft-bert", "finetune-entities-tiny.yaml", f"model.checkpoint={bert_base}", "optim.lr=1e-3",
                 "train.max_steps=50", "train.eval_every=25", "train.checkpoint_every=50", "scaling.threads_per_worker=2")
    finetune_job.run(cfg)
    s = summary("t-ft-bert")
    assert s["final"]["metrics"]["val_entity_f1"] > 0.5, s["final"]
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(s["final"]["checkpoint"])
    assert model.config.model_type == "bert" and model.config.id2label[0] == "O"


def _param_count(checkpoint: str) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(os.path.join(checkpoint, "model.safetensors")).values())


def test_lora_checkpoint_is_merged_and_tags_with_transformers_alone(lora_tagging_run):
    ckpt = lora_tagging_run["final"]["checkpoint"]
    assert not os.path.exists(os.path.join(ckpt, "adapter_config.json"))
    script = textwrap.dedent(f"""
        import sys
        from transformers import pipeline
        tag = pipeline("token-classification", model={ckpt!r}, aggregation_strategy="first")
        out = tag("Ada Okafor of Vela Labs visited Port Elwin in May 2001.")
        assert "cluster" not in sys.modules  # no raylm code: transformers alone
        print(sorted({{e["entity_group"] for e in out}}))
    """)
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PER" in out.stdout or "ORG" in out.stdout or "LOC" in out.stdout


# ---------------------------------------------------------------- data sources


@pytest.fixture(scope="module")
def labelled_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("labelled")
    train = pd.DataFrame(synthetic.topic_classification(120, seed=1))
    val = pd.DataFrame(synthetic.topic_classification(40, seed=2))
    train.to_csv(d / "train.csv", index=False)
    val.to_json(d / "val.jsonl", orient="records", lines=True)
    train.to_parquet(d / "train.parquet")
    return d


def test_csv_jsonl_parquet_and_hf_sources_give_the_same_rows(gpt_base, labelled_files, ray_session):
    from cluster.checkpoints import resolve_checkpoint

    tok = prepare_tokenizer(resolve_checkpoint(gpt_base), "classification", pair=False)
    d = labelled_files
    sources = {
        "files": TaskData(kind="files", train=[str(d / "train.csv")], validation=[str(d / "val.jsonl")]),
        "parquet": TaskData(kind="files", train=[str(d / "train.parquet")], validation=[str(d / "val.jsonl")]),
        "hf": TaskData(kind="hf", dataset="json", data_files={"train": [str(d / "val.jsonl")],
                                                              "validation": [str(d / "val.jsonl")]}),
    }
    prepared = {k: prepare_data("classification", v, tok, token_types=False) for k, v in sources.items()}
    assert prepared["files"].labels == ["finance", "science", "sports", "travel"]
    assert prepared["files"].rows == prepared["parquet"].rows == {"train": 120, "validation": 40}

    def rows(ds):
        return sorted((tuple(r["input_ids"].tolist()), int(r["label"])) for r in ds.take_all())

    assert rows(prepared["files"].train) == rows(prepared["parquet"].train)
    assert rows(prepared["hf"].validation) == rows(prepared["files"].validation) == rows(prepared["hf"].train)


def test_hf_source_reads_its_data_files_and_nothing_in_the_working_directory(labelled_files, tmp_path,
                                                                              monkeypatch, ray_session):
    # Regression: ray.data.from_huggingface re-ran load_dataset("json") without data files to look
    # for the dataset on the Hub, which globbed and parsed every JSON file under the working
    # directory (200 s in this repository) before handing over the split already loaded.
    from cluster.data.tasks import load_splits

    cwd = tmp_path / "job-working-dir"
    (cwd / "logs").mkdir(parents=True)
    pd.DataFrame({"text": ["unrelated"] * 3, "label": ["x"] * 3}).to_json(cwd / "logs" / "other.jsonl",
                                                                        orient="records", lines=True)
    monkeypatch.chdir(cwd)
    touched: list[str] = []
    watching = True

    def audit(event: str, args: tuple) -> None:
        if watching and event in ("open", "os.scandir", "os.listdir") and args and str(args[0]).startswith(str(cwd)):
            touched.append(f"{event} {args[0]}")

    sys.addaudithook(audit)  # hooks cannot be removed: `watching` turns it off after the load
    try:
        train, val, how = load_splits(TaskData(kind="hf", dataset="json", data_files={
            "train": [str(labelled_files / "val.jsonl")], "validation": [str(labelled_files / "val.jsonl")]}))
    finally:
        watching = False
    assert touched == []
    assert how == "split 'validation'" and train.count() == val.count() == 40
    assert set(train.columns()) == {"text", "label"}


def test_validation_carved_from_train_when_none_is_given(gpt_base, labelled_files, ray_session):
    from cluster.checkpoints import resolve_checkpoint

    tok = prepare_tokenizer(resolve_checkpoint(gpt_base), "classification", pair=False)
    p = prepare_data("classification", TaskData(kind="files", train=[str(labelled_files / "train.csv")],
                                                validation_fraction=0.25), tok, token_types=False)
    assert p.rows == {"train": 90, "validation": 30}
    assert "25% of train" in p.stats["validation_from"]


def test_a_column_missing_from_both_splits_is_named_once(ray_session):
    import ray

    from cluster.data.tasks import check_columns

    rows = ray.data.from_items([{"question": "q", "answer": "a"}])
    with pytest.raises(TaskDataError) as err:
        check_columns(TaskData(kind="files", train=["x"]), "completion", {"train": rows, "validation": rows})
    assert str(err.value) == (
        "data.prompt_column: the train and validation splits have no column 'prompt' (columns: question, answer); "
        "data.completion_column: the train and validation splits have no column 'completion' (columns: question, answer)")


# ---------------------------------------------------------------- bad input, refused before training


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = finetune_job.main(list(args))
    return rc, capsys.readouterr().err


def test_unknown_label_column_names_the_key_and_columns(gpt_base, labelled_files, capsys):
    rc, err = _run(capsys, "--config", os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                   "--set", f"model.checkpoint={gpt_base}", "--set", "name=t-bad-col", "--set", "data.kind=files",
                   "--set", f"data.train=[{labelled_files / 'train.csv'}]", "--set", "data.label_column=topic")
    assert rc == 1
    # Refused on the driver from the CSV header, before Ray reads the data.
    assert f"data.label_column: {labelled_files / 'train.csv'} has no column 'topic' (columns: text, label)" in err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "finetune", "t-bad-col"))


def test_validation_labels_missing_from_train_are_refused(gpt_base, labelled_files, tmp_path, capsys):
    val = pd.DataFrame(synthetic.topic_classification(20, seed=3))
    val.loc[0, "label"] = "weather"
    val.loc[1, "label"] = None
    val.to_csv(tmp_path / "val.csv", index=False)
    rc, err = _run(capsys, "--config", os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                   "--set", f"model.checkpoint={gpt_base}", "--set", "name=t-bad-labels", "--set", "data.kind=files",
                   "--set", f"data.train=[{labelled_files / 'train.csv'}]", "--set", f"data.validation=[{tmp_path / 'val.csv'}]")
    assert rc == 1
    assert "1 row(s) of the validation split have no label in 'label'" in err
    assert "validation labels ['weather'] never occur in the training split" in err


def test_completion_on_an_encoder_checkpoint_is_refused(bert_base, capsys):
    rc, err = _run(capsys, "--config", os.path.join(REPO, "configs/finetune-completion-tiny.yaml"),
                   "--set", f"model.checkpoint={bert_base}", "--set", "name=t-bad-family")
    assert rc == 1 and "task 'completion' needs a causal language model checkpoint" in err
    rc, err = _run(capsys, "--config", os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                   "--set", "model.checkpoint=./no/such/dir", "--set", "name=t-bad-path")
    assert rc == 1 and "model.checkpoint './no/such/dir' does not exist" in err


def test_bad_values_name_their_keys(capsys):
    rc, err = _run(capsys, "--config", os.path.join(REPO, "configs/finetune-topic-tiny.yaml"),
                   "--set", "strategy.kind=adapters", "--set", "data.max_length=2", "--set", "task=summarize")
    assert rc == 2
    for key in ("strategy.kind", "data.max_length", "task"):
        assert f"config key '{key}'" in err


def test_synthetic_task_of_the_wrong_kind_is_refused(gpt_base, ray_session):
    with pytest.raises(TaskDataError, match="data.synthetic 'entities' is a tagging task, not classification"):
        TaskData(synthetic="entities").resolved("classification")
