"""Fine-tuning logic without Ray: task metrics against scikit-learn / seqeval, tokenization and
label alignment, the completion mask, strategies (what trains), LoRA export and resume, and the
checks that refuse bad input before any training starts."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from cluster.checkpoints import check_family, prepare_tokenizer
from cluster.config import ConfigError, build
from cluster.data import synthetic, synthetic_tasks, task_prep, tasks
from cluster.data.tokenizer import TokenizerConfig, train_tokenizer
from cluster.errors import JobError
from cluster.objectives import metrics as M
from cluster.objectives.tasks import IGNORE_INDEX, Completion, TokenClassification
from cluster.stages.finetune import FinetuneConfig, build_task_model
from cluster.train.checkpoint import STATE_DIR, TrainState, restore, save_checkpoint
from cluster.train.models import ModelConfig, build_model, special_ids
from cluster.train.optim import apply_hyperparameters, lr_lambda, param_groups
from cluster.train.strategies import StrategyConfig, apply_strategy, check_strategy

TEXTS = [d.text for d in synthetic.documents(400, seed=3)]


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer(TEXTS, TokenizerConfig(kind="bpe", vocab_size=600, model_max_length=128))


@pytest.fixture(scope="module")
def wp_tok():
    return train_tokenizer(TEXTS, TokenizerConfig(kind="wordpiece", vocab_size=600, model_max_length=128))


def save_base(path, family: str, tok) -> str:
    """A tiny random 'pretrained' checkpoint, as jobs.pretrain writes it."""
    model = build_model(ModelConfig(family=family, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=128),
                        len(tok), special_ids(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt_base(tmp_path_factory, bpe_tok):
    return save_base(tmp_path_factory.mktemp("gpt-base"), "gpt2", bpe_tok)


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory, wp_tok):
    return save_base(tmp_path_factory.mktemp("bert-base"), "bert", wp_tok)


def files_json(tok) -> str:
    return json.dumps(task_prep.tokenizer_files(tok))


# ---------------------------------------------------------------- metrics


def test_macro_f1_and_accuracy_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    gold = [rng.randrange(5) for _ in range(500)]
    pred = [g if rng.random() < 0.6 else rng.randrange(4) for g in gold]  # class 4 is never predicted
    sums: dict[str, float] = {}
    for i in range(0, 500, 64):  # counts from batches add up to the whole
        for k, v in M.class_counts(pred[i:i + 64], gold[i:i + 64], 6).items():
            sums[k] = sums.get(k, 0.0) + v
    scores = M.classification_scores(sums, 6)  # label 5 occurs nowhere: not averaged in
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))


def _random_bio(rng: random.Random, n: int) -> list[str]:
    tags = []
    for _ in range(n):
        kind = rng.choice(["PER", "LOC", "ORG"])
        tags.append(rng.choice(["O", "O", f"B-{kind}", f"I-{kind}"]))
    return tags


def test_entity_scores_match_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(1)
    gold = [_random_bio(rng, rng.randrange(3, 20)) for _ in range(300)]
    pred = [[t if rng.random() < 0.8 else rng.choice(["O", "B-PER", "I-LOC"]) for t in g] for g in gold]
    sums = M.entity_counts(pred, gold, ["LOC", "ORG", "PER"])
    scores = M.entity_scores(sums, ["LOC", "ORG", "PER"])
    assert scores["entity_f1"] == pytest.approx(f1_score(gold, pred))
    assert scores["entity_precision"] == pytest.approx(precision_score(gold, pred))
    assert scores["entity_recall"] == pytest.approx(recall_score(gold, pred))


def test_generation_scores_bound_identical_and_disjoint_texts():
    same = M.generation_scores(["sports: Ada Okafor."] * 3, ["sports: Ada Okafor."] * 3)
    assert same["rouge_l"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    other = M.generation_scores(["finance none"] * 3, ["sports: Ada Okafor, Port Elwin."] * 3)
    assert other["rouge_l"] == 0.0 and other["bleu"] < 1.0


# ---------------------------------------------------------------- tokenization and alignment


@pytest.mark.parametrize("which", ["bpe", "wordpiece"])
def test_each_word_labels_exactly_its_first_sub_token(which, bpe_tok, wp_tok):
    tok = bpe_tok if which == "bpe" else wp_tok
    rows = synthetic_tasks.entity_tagging(30, seed=2)
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    label2id = {t: i for i, t in enumerate(labels)}
    for row in rows:
        words, tags = row["tokens"], row["tags"]
        ids, lab, cut = task_prep.align_word_labels(words, [label2id[t] for t in tags], tok, 512)
        assert not cut
        scored = np.flatnonzero(lab != IGNORE_INDEX)
        assert [labels[i] for i in lab[scored]] == tags  # one label per word, in order
        for word, pos in zip(words, scored, strict=True):  # ... on the token where the word starts
            assert tok.decode([int(ids[pos])]).strip() == word[: len(tok.decode([int(ids[pos])]).strip())]


def test_tagging_truncation_is_reported_and_keeps_whole_labels(bpe_tok):
    words = ["Ada", "Okafor", "met", "Ben", "Lind", "in", "Calder", "."] * 10
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"] * 10
    ids, lab, cut = task_prep.align_word_labels(words, [0] * len(tags), bpe_tok, 16)
    assert cut and len(ids) == 16 and (lab != IGNORE_INDEX).sum() < len(words)


def test_completion_loss_covers_completion_and_eos_only(bpe_tok):
    import pandas as pd

    cfg = tasks.TaskData(max_length=24).resolved("completion")
    batch = pd.DataFrame([{"prompt": "Ada Okafor scored in Tarn.\nTopic and names:", "completion": " sports: Ada Okafor."},
                          {"prompt": "x " * 40, "completion": " travel: none."}])
    out = task_prep._tokenize(batch, "completion", files_json(bpe_tok), cfg.model_dump(), None, False)
    objective = Completion(bpe_tok, sample_limit=0, max_new_tokens=4)
    inputs = objective.collate({k: np.array(v, dtype=object) if k == "input_ids" else v for k, v in out.items()},
                               (0,))
    for i in range(2):
        labels, ids = inputs["labels"][i], inputs["input_ids"][i]
        target = bpe_tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
        assert target.endswith(bpe_tok.eos_token)
        assert target.removesuffix(bpe_tok.eos_token) == [" sports: Ada Okafor.", " travel: none."][i]
        assert (labels[: int(inputs["prompt_len"][i])] == IGNORE_INDEX).all()
        assert len(ids) <= 24
    assert int(inputs["prompt_len"][1]) == 24 - len(bpe_tok(" travel: none.")["input_ids"]) - 1  # prompt cut on the left


def test_pair_template_and_token_types_are_saved_with_the_tokenizer(tmp_path, gpt_base, bert_base):
    from transformers import AutoTokenizer

    gpt = prepare_tokenizer(gpt_base, "classification", pair=True)
    ids = gpt("Shares rose.", "Ada scored.")["input_ids"]
    assert gpt.eos_token_id in ids  # "A <eos> B" for a tokenizer without a pair template
    bert = prepare_tokenizer(bert_base, "classification", pair=True, token_types=True)
    bert.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # what Serve and pipeline() load
    enc = again("Shares rose.", "Ada scored.")
    assert enc["input_ids"].count(again.sep_token_id) == 2 and 1 in enc["token_type_ids"]


# ---------------------------------------------------------------- strategies and checkpoints


def finetune_cfg(task: str, checkpoint: str, **strategy) -> FinetuneConfig:
    return build(FinetuneConfig, {"task": task, "model": {"checkpoint": checkpoint}, "strategy": strategy})


META = {"labels": ["finance", "science", "sports", "travel"], "pad_id": 1}


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_frozen_trains_the_head_and_top_k_blocks_only(gpt_base):
    cfg = finetune_cfg("classification", gpt_base, kind="frozen", unfreeze_top_k=1)
    model = apply_strategy(build_task_model(cfg, META, gpt_base), cfg.strategy, cfg.task)
    names = trainable_names(model)
    assert names and all(n.startswith(("score.", "transformer.h.1.")) for n in names)
    assert any(n.startswith("score.") for n in names) and any(".h.1." in n for n in names)


def test_lora_trains_only_adapters_and_the_head(bert_base):
    cfg = finetune_cfg("tagging", bert_base, kind="lora", lora={"rank": 4})
    meta = {"labels": ["O", "B-PER", "I-PER"], "pad_id": 0}
    model = apply_strategy(build_task_model(cfg, meta, bert_base), cfg.strategy, cfg.task)
    names = trainable_names(model)
    lora = [n for n in names if "lora_" in n]
    head = [n for n in names if "classifier" in n]
    assert sorted(lora + head) == sorted(names)
    # rank 4 on query and value of 2 layers: A (4 x 32) and B (32 x 4) per module
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == 2 * 2 * (4 * 32 + 32 * 4)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) < 0.1 * sum(
        p.numel() for p in model.parameters())


def test_lora_on_gpt2_conv1d_layers_is_configured_for_them(gpt_base):
    # Regression: every LoRA fine-tune of a GPT-2 warned from peft "fan_in_fan_out is set to False
    # but the target module is `Conv1D`. Setting fan_in_fan_out to True." (per worker, per run), and
    # every LoRA run "`is_gradient_checkpointing` is deprecated" (peft reading transformers' property)
    import warnings

    cfg = finetune_cfg("classification", gpt_base, kind="lora", lora={"rank": 4})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("error", message=".*is_gradient_checkpointing.*")
        model = apply_strategy(build_task_model(cfg, {"labels": ["a", "b"], "pad_id": 0}, gpt_base), cfg.strategy,
                               cfg.task)
    assert model.peft_config["default"].fan_in_fan_out


def _perturbed_lora_model(base: str, task: str, meta: dict) -> torch.nn.Module:
    cfg = finetune_cfg(task, base, kind="lora", lora={"rank": 4})
    model = apply_strategy(build_task_model(cfg, meta, base), cfg.strategy, cfg.task)
    torch.manual_seed(5)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make merging trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def _optimizer(model):
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10, 0.1))


@pytest.mark.parametrize("task, base_name", [("classification", "gpt"), ("tagging", "bert"), ("completion", "gpt")])
def test_lora_export_is_merged_and_matches_the_adapter_model(tmp_path, task, base_name, gpt_base, bert_base, bpe_tok):
    import transformers

    base = gpt_base if base_name == "gpt" else bert_base
    meta = {**META, "labels": None if task == "completion" else META["labels"]}
    model = _perturbed_lora_model(base, task, meta)
    opt, sched = _optimizer(model)
    save_checkpoint(str(tmp_path), model, bpe_tok, opt, sched, TrainState(step=3), {}, rank=0)
    cls = {"classification": transformers.AutoModelForSequenceClassification,
           "tagging": transformers.AutoModelForTokenClassification,
           "completion": transformers.AutoModelForCausalLM}[task]
    exported = cls.from_pretrained(str(tmp_path)).eval()  # transformers alone, no peft
    assert not any("lora" in n for n, _ in exported.named_parameters())
    ids = torch.randint(5, 500, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / STATE_DIR / "adapter.safetensors").exists()


def test_lora_resume_restores_the_adapter_and_config_hyperparameters(tmp_path, gpt_base, bpe_tok):
    trained = _perturbed_lora_model(gpt_base, "classification", META)
    opt, sched = _optimizer(trained)
    for _ in range(4):  # four steps of the schedule; no gradients, so the weights stay as they are
        opt.step()
        sched.step()
    save_checkpoint(str(tmp_path), trained, bpe_tok, opt, sched, TrainState(step=4), {}, rank=0)
    fresh = _perturbed_lora_model(gpt_base, "classification", META)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    opt2, sched2 = _optimizer(fresh)
    state = restore(str(tmp_path), fresh, opt2, sched2)
    assert state.step == 4 and sched2.last_epoch == 4
    ids = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)
    # PBT: a resumed trial trains with its own (mutated) optimizer values, at the restored step
    opt_cfg = build(FinetuneConfig, {"task": "classification", "model": {"checkpoint": "x"},
                                     "optim": {"lr": 5e-3, "weight_decay": 0.2}}).optim
    apply_hyperparameters(opt2, sched2, opt_cfg)
    factor = lr_lambda("cosine", 2, 10, 0.1)(4)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([5e-3 * factor] * 2)
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.2, 0.0]
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3 * lr_lambda("cosine", 2, 10, 0.1)(5))


def test_tagging_objective_scores_entities_in_eval_mode_only(bert_base):
    labels = ["O", "B-PER", "I-PER"]
    cfg = finetune_cfg("tagging", bert_base)
    model = build_task_model(cfg, {"labels": labels, "pad_id": 0}, bert_base)
    objective = TokenClassification(labels, pad_id=0)
    batch = {"input_ids": np.array([np.arange(5, 12), np.arange(5, 9)], dtype=object),
             "labels": np.array([np.array([-100, 1, 2, 0, -100, 0, -100]), np.array([-100, 1, 0, -100])], dtype=object)}
    inputs = objective.collate(batch, (0,))
    model.train()
    _, train_stats = objective.forward(model, inputs)
    assert "tp_PER" not in train_stats
    model.eval()
    _, stats = objective.forward(model, inputs)
    summary = objective.summarize({k: float(v) for k, v in stats.items()})
    assert 0.0 <= summary["entity_f1"] <= 1.0 and stats["tokens"] == 6


# ---------------------------------------------------------------- refused before training


def test_a_new_head_is_reported_in_one_line_not_as_a_table(bert_base, capfd, caplog):
    # transformers printed a LOAD REPORT table of every new and unused tensor (~20 lines per worker
    # and per sweep trial) and a progress bar; one line of module names says the same.
    from cluster.stages.finetune import build_task_model
    from cluster.train.strategies import module_names

    assert module_names(["classifier.weight", "classifier.bias", "predictions.bias", "predictions.dense.bias",
                         "albert.pooler.weight"]) == ["albert.pooler", "classifier", "predictions"]
    cfg = build(FinetuneConfig, {"task": "tagging", "model": {"checkpoint": bert_base}})
    with caplog.at_level("INFO", logger="cluster.stages.finetune"):
        model = build_task_model(cfg, {"labels": ["O", "B-X", "I-X"], "pad_id": 0}, bert_base)
    assert model.config.num_labels == 3
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err
    line = [r.getMessage() for r in caplog.records if "BertForTokenClassification from" in r.getMessage()]
    assert line and line[0].endswith(": new classifier; not used bert.pooler.dense, cls.predictions, cls.seq_relationship"), line


def test_completion_needs_a_causal_checkpoint_and_heads_must_exist():
    with pytest.raises(JobError, match="causal language model"):
        check_family("completion", {"model_type": "bert", "architectures": ["BertForPreTraining"]}, "ckpt")
    check_family("classification", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "ckpt")
    with pytest.raises(JobError, match="has no AutoModelForTokenClassification head"):
        check_family("tagging", {"model_type": "no-such-model"}, "ckpt")


def test_strategy_problems_are_found_on_the_driver(gpt_base, bert_base):
    gpt_config = json.load(open(f"{gpt_base}/config.json"))
    with pytest.raises(JobError, match="unfreeze_top_k 0"):
        check_strategy(finetune_cfg("completion", gpt_base, kind="frozen"), gpt_config)
    with pytest.raises(JobError, match="exceeds the model's 2 blocks"):
        check_strategy(finetune_cfg("classification", gpt_base, kind="frozen", unfreeze_top_k=3), gpt_config)
    with pytest.raises(JobError, match=r"\['query'\] are not modules of gpt2 \(its linear layers: c_attn, c_fc, "
                       r"c_proj, score\)"):
        check_strategy(finetune_cfg("classification", gpt_base, kind="lora", lora={"target_modules": ["query"]}),
                       gpt_config)
    check_strategy(finetune_cfg("classification", bert_base, kind="lora", lora={"target_modules": ["query"]}),
                   json.load(open(f"{bert_base}/config.json")))


def test_lora_with_fsdp_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="LoRA with FSDP"):
        build(FinetuneConfig, {"task": "tagging", "model": {"checkpoint": "x"}, "strategy": {"kind": "lora"},
                               "scaling": {"strategy": "fsdp"}})


def test_label_problems_name_the_split_and_column():
    cfg = tasks.TaskData(label_column="topic")
    stats = {"train": task_prep.SplitStats(rows=10, labels={"a": 5, "b": 5}),
             "validation": task_prep.SplitStats(rows=4, missing=1, labels={"a": 1, "c": 2})}
    with pytest.raises(tasks.TaskDataError) as err:
        task_prep.infer_labels("classification", cfg, stats)
    assert "1 row(s) of the validation split have no label in 'topic'" in str(err.value)
    assert "validation labels ['c'] never occur in the training split" in str(err.value)
    assert StrategyConfig().kind == "full"


def test_sweep_mode_against_the_metric_direction_is_refused():
    from tune.config import SweepConfig, check_sweep

    base = {"name": "s", "finetune": {"task": "completion", "model": {"checkpoint": "x"}},
            "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    with pytest.raises(ConfigError, match="mode 'max' would pick the worst trial: 'val_loss' is better when lower"):
        check_sweep(build(SweepConfig, {**base, "metric": "val_loss", "mode": "max"}))
    cfg = build(SweepConfig, {**base, "metric": "val_loss"})
    check_sweep(cfg)
    assert cfg.objective == ("val_loss", "min")
    assert build(SweepConfig, base).objective == ("val_rouge_l", "max")


def test_trial_config_sets_dotted_values_and_checkpoints_every_evaluation():
    from tune.config import trial_config

    base = build(FinetuneConfig, {"task": "tagging", "model": {"checkpoint": "x"},
                                  "train": {"eval_every": 7, "checkpoint_every": 50}}).to_dict()
    out = trial_config(base, {"optim.lr": 0.01, "strategy.lora.rank": 16})
    assert out["optim"]["lr"] == 0.01 and out["strategy"]["lora"]["rank"] == 16
    assert out["train"]["checkpoint_every"] == 7 and base["optim"]["lr"] == 5e-4  # base untouched


@pytest.mark.parametrize("search_alg", ["random", "grid"])
def test_a_seeded_search_holds_trials_to_max_concurrent_trials(tmp_path, search_alg):
    # Regression: the seeded random search (the demo's) was a generator Tune took as it was, and
    # Tune ignored max_concurrent_trials for it ("You have passed a `SearchGenerator`..."): every
    # trial that fitted the CPUs ran at once.
    from ray.tune.experiment import Experiment

    from tune.config import SweepConfig
    from tune.search import build_search

    cfg = build(SweepConfig, {"name": "s", "finetune": {"task": "classification", "model": {"checkpoint": "x"}},
                              "search": {"optim.lr": {"grid" if search_alg == "grid" else "loguniform": [1e-4, 1e-2]}},
                              "search_alg": {"kind": search_alg, "seed": 0}, "num_samples": 6,
                              "max_concurrent_trials": 2})
    space, generator = build_search(cfg)
    if search_alg == "grid":  # Tune builds the generator itself, with the limit
        assert generator is None
        return
    generator.add_configurations([Experiment(name="s", run=lambda config: None, config=space, num_samples=6,
                                             storage_path=str(tmp_path))])
    assert [generator.next_trial() is not None for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_trial_shape_asks_tune_for_resources_it_accepts(workers):
    # Regression: a trial with N workers asked Tune for {"cpu": 0}, which Tune refuses ("Cannot
    # initialize a ResourceRequest with an empty head and zero worker bundles"): every sweep with
    # trial.workers > 1 failed before its first trial.
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from tune.config import TrialConfig
    from tune.trial import trial_resources

    wanted = resource_dict_to_pg_factory(trial_resources(TrialConfig(workers=workers, cpus=2))).required_resources
    # one worker reserves its own CPUs; N workers reserve theirs in the TorchTrainer the trial drives
    assert wanted["CPU"] == (2 if workers == 1 else 0.01)


def test_pbt_pruning_keeps_the_best_the_latest_and_what_a_clone_will_restore(tmp_path):
    # Regression: under PBT, Tune kept 1 checkpoint per trial (the best); a bottom trial cloned the
    # checkpoint a top trial had at its last perturbation after that trial had saved a better one and
    # deleted it: "Could not recover from checkpoint as it does not exist on storage anymore".
    from types import SimpleNamespace

    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    from tune.search import PBTCheckpointPruner, prunable

    # oldest first; keep the best 1 (max), the latest 2 and what is in use
    saved = [("c0", 0.5), ("c1", 0.9), ("c2", 0.6), ("c3", None), ("c4", 0.7), ("c5", 0.8)]
    assert prunable(saved, "max", 1, 2, in_use=set()) == ["c0", "c2", "c3"]
    assert prunable(saved, "min", 1, 2, in_use={"c2"}) == ["c1", "c3"]
    assert prunable(saved[:2], "max", 1, 2, in_use=set()) == []

    def trial(trial_id, path, score):
        ckpt = Checkpoint(str(path)) if path else None
        return SimpleNamespace(trial_id=trial_id, checkpoint=ckpt, latest_checkpoint_result=_TrainingResult(
            checkpoint=ckpt, metrics={"val_accuracy": score}) if ckpt else None)

    pruner = PBTCheckpointPruner("val_accuracy", "max", keep_best=1, keep_recent=2)
    top, clone = tmp_path / "top", tmp_path / "clone"
    dirs = [top / f"checkpoint_{i}" for i in range(5)]
    for d in dirs:
        d.mkdir(parents=True)
    a, b = trial("a", None, None), trial("b", None, None)
    for i, score in enumerate([0.9, 0.4, 0.5, 0.6, 0.7]):  # the best came first, then a decline
        a = trial("a", dirs[i], score)
        if i == 1:  # b, waiting for a free slot, will restart from a's checkpoint_1
            b = trial("b", dirs[1], 0.4)
        pruner.on_trial_save(iteration=i, trials=[a, b], trial=a)
    assert sorted(p.name for p in top.iterdir()) == ["checkpoint_0", "checkpoint_1", "checkpoint_3", "checkpoint_4"]
    b = trial("b", clone / "checkpoint_0", 0.8)  # b restarted and saved its own: a's checkpoint_1 goes next
    (clone / "checkpoint_0").mkdir(parents=True)
    pruner.on_trial_save(iteration=6, trials=[a, b], trial=b)
    pruner.on_trial_save(iteration=7, trials=[a, b], trial=a)
    assert sorted(p.name for p in top.iterdir()) == ["checkpoint_0", "checkpoint_3", "checkpoint_4"]
    restored = PBTCheckpointPruner("val_accuracy", "max", 1, 2)
    restored.set_state(pruner.get_state())  # a restored sweep goes on from what was saved
    assert restored._saved == pruner._saved


def test_a_sweep_whose_best_is_the_untuned_model_publishes_nothing(tmp_path, monkeypatch):
    # Found running a tagging sweep on a barely pretrained ALBERT: every trial's best evaluation was
    # the one before any step, and the sweep published that checkpoint, the base model with a
    # randomly initialised head, as its best.
    from tune.config import SweepConfig
    from tune.driver import publish_best

    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path))
    cfg = build(SweepConfig, {"name": "s", "finetune": {"task": "tagging", "model": {"checkpoint": "x"}},
                              "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}})
    best = {"trial_id": "t0", "val_entity_f1": 0.0407, "best_step": 0, "checkpoint": str(tmp_path / "ckpt")}
    out = publish_best(cfg, None, best, {})
    assert out["published"] is False and not (tmp_path / "registry").exists()
    assert out["reason"].startswith("no trial improved on the untuned model (val_entity_f1 0.0407 before any step)")
    # a later step goes on to the registry, which checks the checkpoint
    ts = type("TaskSetup", (), {"meta": {"labels": ["O", "B-X", "I-X"]}})()
    out = publish_best(cfg, ts, {**best, "best_step": 30}, {})
    assert out["published"] is False and "does not exist" in out["reason"]


def test_a_pbt_trial_row_carries_the_values_that_trained_its_best_checkpoint(tmp_path):
    # Regression (found walking a PBT sweep): the results table and the published config took a
    # trial's final, mutated learning rate for a best checkpoint saved under an earlier one; a trial
    # cloned at its last step was listed under the id of the trial it cloned.
    from types import SimpleNamespace

    import pandas as pd
    from ray.tune import Checkpoint

    from tune.config import SweepConfig
    from tune.results import trial_rows

    cfg = build(SweepConfig, {"name": "s", "finetune": {"task": "classification", "model": {"checkpoint": "x"}},
                              "search": {}, "scheduler": {"kind": "pbt", "mutations": {
                                  "optim.lr": {"loguniform": [1e-4, 1e-2]}}}})
    ckpts = {}
    for step, lr in ((30, 8e-4), (60, 4e-4)):  # lr mutated to 4e-4 after step 30
        d = tmp_path / "trial_main_a_0" / f"checkpoint_{step}"
        (d / "train_state").mkdir(parents=True)
        (d / "train_state" / "config.json").write_text(json.dumps({"optim": {"lr": lr}, "train": {"max_steps": 60}}))
        ckpts[step] = (Checkpoint(str(d)), {"val_accuracy": 0.98 if step == 30 else 0.9, "step": step})
    df = pd.DataFrame({"trial_id": ["a"] * 3, "step": [0, 30, 60], "val_accuracy": [0.25, 0.98, 0.9]})
    result = SimpleNamespace(metrics_dataframe=df, config={"optim.lr": 4e-4}, path=str(tmp_path / "trial_main_a_0"),
                             error=None, best_checkpoints=list(ckpts.values()),
                             metrics={"trial_id": "b", "val_accuracy": 0.99})  # cloned b at its last step
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["trial_id"] == "a" and row["val_accuracy"] == 0.98 and row["best_step"] == 30
    assert row["checkpoint"] == ckpts[30][0].path and row["optim.lr"] == 8e-4
    # a checkpoint raylm did not write (no train_state/config.json): the trial's config stands
    (tmp_path / "trial_main_a_0" / "checkpoint_30" / "train_state" / "config.json").unlink()
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["optim.lr"] == 4e-4


def test_a_pbt_trial_whose_result_file_lost_its_last_lines_is_still_done(tmp_path):
    # Regression (CI): Tune re-copied result.json from storage when PBT restarted a trial in place
    # (reused actors), over a local copy with more lines; the file ended at step 30 of 60, so a
    # finished trial was listed as STOPPED at step 30. The checkpoint reports Tune holds fill it in.
    from types import SimpleNamespace

    import pandas as pd
    from ray.tune import Checkpoint

    from tune.config import SweepConfig
    from tune.results import trial_rows

    cfg = build(SweepConfig, {"name": "s", "finetune": {"task": "classification", "model": {"checkpoint": "x"}},
                              "search": {}, "scheduler": {"kind": "pbt", "mutations": {
                                  "optim.lr": {"loguniform": [1e-4, 1e-2]}}}})
    reports = []
    for step, acc in ((10, 0.5), (20, 0.96), (30, 0.98), (40, 1.0), (60, 1.0)):
        d = tmp_path / "trial_main_a_0" / f"checkpoint_{step}"
        d.mkdir(parents=True)
        reports.append((Checkpoint(str(d)), {"val_accuracy": acc, "step": step}))
    df = pd.DataFrame({"trial_id": ["a"] * 4, "step": [0, 10, 20, 30], "val_accuracy": [0.25, 0.5, 0.96, 0.98]})
    result = SimpleNamespace(metrics_dataframe=df, config={"optim.lr": 4e-4}, path=str(tmp_path / "trial_main_a_0"),
                             error=None, best_checkpoints=reports, metrics={"trial_id": "a", "val_accuracy": 1.0})
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["status"] == "DONE" and row["steps"] == 60, row
    assert row["val_accuracy"] == 1.0 and row["best_step"] == 40 and row["untuned"] == 0.25
    assert row["checkpoint"] == reports[3][0].path
    # a trial ASHA stopped at step 30 stays STOPPED
    result.best_checkpoints = reports[:3]
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["status"] == "STOPPED" and row["steps"] == 30


def test_a_pbt_trial_cloned_from_its_sources_final_checkpoint_is_done(tmp_path):
    # Regression (CI, PBT sweep test): a bottom trial that PBT restarted from a top trial's checkpoint at
    # the final step had nothing left to train and reported nothing more; its own reports ended at step
    # 10, so it was listed as STOPPED. Tune's last result for it is its source's, at step 60 (seen in a
    # PBT run of a plain function trainable: such trials have results up to step 10 and metrics at 60).
    from types import SimpleNamespace

    import pandas as pd
    from ray.tune import Checkpoint

    from tune.config import SweepConfig
    from tune.results import trial_rows

    cfg = build(SweepConfig, {"name": "s", "finetune": {"task": "classification", "model": {"checkpoint": "x"}},
                              "search": {}, "scheduler": {"kind": "pbt", "mutations": {
                                  "optim.lr": {"loguniform": [1e-4, 1e-2]}}}})
    d = tmp_path / "trial_main_b_1" / "checkpoint_10"
    d.mkdir(parents=True)
    own = (Checkpoint(str(d)), {"val_accuracy": 0.5, "step": 10})
    df = pd.DataFrame({"trial_id": ["b"] * 2, "step": [0, 10], "val_accuracy": [0.25, 0.5]})
    result = SimpleNamespace(metrics_dataframe=df, config={"optim.lr": 4e-4}, path=str(tmp_path / "trial_main_b_1"),
                             error=None, best_checkpoints=[own],
                             metrics={"trial_id": "a", "step": 60, "val_accuracy": 1.0})  # a's final result
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["status"] == "DONE" and row["steps"] == 60, row
    # the row stays the trial's own: its id, its best evaluation and checkpoint
    assert row["trial_id"] == "b" and row["val_accuracy"] == 0.5 and row["best_step"] == 10
    assert row["checkpoint"] == own[0].path
    # a trial stopped at step 10 (its last result there) stays STOPPED
    result.metrics = {"trial_id": "b", "step": 10, "val_accuracy": 0.5}
    (row,) = trial_rows(cfg, [result], max_steps=60)
    assert row["status"] == "STOPPED" and row["steps"] == 10


def test_a_pretraining_run_folder_stands_for_its_best_checkpoint(tmp_path):
    # Regression (found by the sweep drill): a run folder's path was taken as a checkpoint and refused
    # with "has no config.json"; its name already resolved to its best checkpoint, its path now does too.
    from cluster.checkpoints import resolve_checkpoint

    run = tmp_path / "pretrain" / "r"
    for step in ("0000010", "0000020"):
        (run / f"checkpoint_{step}").mkdir(parents=True)
        (run / f"checkpoint_{step}" / "config.json").write_text("{}")
    best, final = str(run / "checkpoint_0000010"), str(run / "checkpoint_0000020")
    (run / "summary.json").write_text(json.dumps({"best": {"checkpoint": best}, "final": {"checkpoint": final}}))
    assert resolve_checkpoint(str(run)) == best
    assert resolve_checkpoint("r", root=str(tmp_path)) == best
    assert resolve_checkpoint(final) == final  # a checkpoint folder is itself
    (run / "summary.json").write_text(json.dumps({"final": {"checkpoint": final}}))
    assert resolve_checkpoint(str(run)) == final


def test_classification_collate_takes_read_only_label_arrays_without_a_warning():
    # Ray Data hands Arrow columns over zero-copy, so they are read-only; torch.from_numpy on one
    # warned once per worker (regression). The labels are now a copy.
    from cluster.objectives.tasks import SequenceClassification

    labels = np.array([1, 0], dtype=np.int64)
    labels.flags.writeable = False
    ids = np.empty(2, dtype=object)
    ids[0], ids[1] = np.array([5, 6, 7]), np.array([5, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = SequenceClassification(["a", "b"], pad_id=0, token_types=False).collate(
            {"input_ids": ids, "label": labels}, (0,))
    assert out["labels"].tolist() == [1, 0] and out["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]


def test_data_files_missing_a_column_are_refused_from_their_first_bytes(tmp_path):
    # jobs.finetune checks this before Ray starts (it used to take a Ray Data read, ~20 s here).
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "qa.json").write_text('[{"prompt": "p", "answer": "a"}]')
    (tmp_path / "qa.csv.gz").write_bytes(gzip.compress(b"\xef\xbb\xbfprompt,completion\np,c\n"))
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"]}), tmp_path / "qa.parquet")
    assert tasks.file_columns(str(tmp_path / "qa.csv.gz")) == ["prompt", "completion"]
    cfg = tasks.TaskData(kind="files", train=str(tmp_path / "qa.*"))
    with pytest.raises(tasks.TaskDataError) as err:
        tasks.check_file_columns(cfg, "completion")
    assert str(err.value) == "; ".join([
        f"data.completion_column: {tmp_path / 'qa.json'} has no column 'completion' (columns: prompt, answer)",
        f"data.prompt_column: {tmp_path / 'qa.jsonl'} has no column 'prompt' (columns: question, answer)",
        f"data.completion_column: {tmp_path / 'qa.jsonl'} has no column 'completion' (columns: question, answer)"])
    tasks.check_file_columns(cfg.model_copy(update={"train": [str(tmp_path / "qa.csv.gz"), str(tmp_path / "qa.parquet")]}),
                             "completion")
    tasks.check_file_columns(cfg.model_copy(update={"prompt_column": "question", "completion_column": "answer",
                                                    "train": [str(tmp_path / "qa.jsonl")]}), "completion")
    with pytest.raises(tasks.TaskDataError, match="data.validation: .*nope.csv' does not exist"):
        tasks.check_file_columns(cfg.model_copy(update={"validation": [str(tmp_path / "nope.csv")]}), "completion")


def test_generation_scores_stem_and_log_nothing(caplog):
    # rouge-score logged "Using default tokenizer." (INFO) at every evaluation, into the job's console.
    with caplog.at_level("INFO"):
        stemmed = M.generation_scores(["the markets rallied"], ["the market rally"])
    assert stemmed["rouge_l"] == pytest.approx(100.0)
    assert not [r for r in caplog.records if "tokenizer" in r.getMessage()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_trains_without_deprecation_or_cache_warnings(family):
    # Regression: every worker warned twice per run: transformers 5.24 deprecated
    # gradient_checkpointing_enable (FutureWarning), and the training forward asked for a KV cache
    # that checkpointing turns off ("use_cache=True is incompatible with gradient checkpointing").
    import logging
    import warnings

    import torch

    from cluster.objectives.lm import CausalLM

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model = build_model(ModelConfig(family=family, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=64,
                                            activation_checkpointing=True), 100, {"pad": 0, "bos": 1, "eos": 2})
            model.train()
            ids = torch.randint(3, 100, (2, 16))
            loss, _ = CausalLM(bytes_per_token=4.0).forward(model, {"input_ids": ids})
            loss.backward()
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "use_cache" in r.getMessage()]
    assert torch.isfinite(loss)
    # checkpointing is on: the blocks recompute in backward
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_sweeps_set_tune_s_snapshot_settings_unless_the_user_did():
    # Regression: a 4-trial sweep printed Tune's 4-line "Experiment state snapshotting has been
    # triggered multiple times" warning 14 times (the demo too): trials checkpoint every evaluation.
    from tune.driver import tune_env_defaults

    env: dict[str, str] = {}
    tune_env_defaults(env)
    assert env == {"TUNE_GLOBAL_CHECKPOINT_S": "2", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    env = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "5"}
    tune_env_defaults(env)
    assert env["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "5"


def test_a_hub_id_on_a_machine_without_network_is_looked_up_in_the_local_cache_alone(tmp_path, monkeypatch, caplog):
    """Offline, a mistyped run name (taken for a hub id) was refused only after huggingface_hub had
    retried five times with backoff (~25 s). With a hub host that does not resolve, the id is looked
    up in the local Hugging Face cache alone: a cached model still loads, anything else fails at once."""

    from huggingface_hub import constants

    from cluster.checkpoints import base_config

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.raylm-test.invalid")  # .invalid never resolves
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3}))
    (tmp_path / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "models--someone--cached" / "refs" / "main").write_text("abc123")

    assert base_config("someone/cached")["n_layer"] == 3
    with pytest.raises(JobError, match=r"hub.raylm-test.invalid does not resolve \(offline\), and it is not in "
                                       r"the local Hugging Face cache"):
        base_config("someone/mistyped")
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_a_cached_hub_model_loads_offline_without_retrying_each_file(tmp_path, monkeypatch, caplog):
    """base_config found a cached hub model at once offline, but the tokenizer (driver) and the
    weights (every worker) were then fetched with five retries per file looked up: a 5-step
    fine-tune of a cached hub model took 3 min 44 s, 31.8 s after the fix."""
    import logging

    from huggingface_hub import constants

    from cluster.checkpoints import prepare_tokenizer
    from cluster.stages.finetune import build_task_model
    from serve import tiny

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.raylm-test.invalid")  # .invalid never resolves
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-gpt"
    tiny.save_gpt(str(repo / "snapshots" / "abc123"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    caplog.set_level(logging.WARNING)

    tok = prepare_tokenizer("someone/tiny-gpt", "classification", pair=False)
    cfg = FinetuneConfig.model_validate({"task": "classification", "model": {"checkpoint": "someone/tiny-gpt"}})
    model = build_task_model(cfg, {"labels": ["a", "b"], "pad_id": tok.pad_token_id}, "someone/tiny-gpt")
    assert model.config.num_labels == 2 and tok.pad_token is not None
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
