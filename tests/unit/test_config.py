import glob
import os

import pytest
from pydantic import ValidationError

from cluster.config import ConfigError, build, load_config, parse_overrides, same_config
from cluster.stages.finetune import FinetuneConfig
from cluster.stages.prepare import PrepareConfig
from cluster.stages.pretrain import PretrainConfig
from tune.config import SweepConfig, check_sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_overrides_parse_yaml_values_and_nest():
    tree = parse_overrides(["optim.lr=3e-4", "train.precision=bf16", "scaling.resources_per_worker={a: 1}"])
    assert tree == {"optim": {"lr": 3e-4}, "train": {"precision": "bf16"},
                    "scaling": {"resources_per_worker": {"a": 1}}}


def test_all_problems_reported_at_once_with_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("corpus: x\ntrain: {batch_sise: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path, ["optim.lr=-1", "model.family=gpt9"])
    msg = str(err.value)
    assert "'train.batch_sise': unknown key" in msg
    assert "'optim.lr'" in msg and "'model.family'" in msg
    assert "3 problem(s)" in msg


def test_override_indexes_lists_and_rejects_bad_index():
    cfg = load_config(PrepareConfig, os.path.join(REPO, "configs/prepare-synthetic.yaml"), ["sources.0.num_docs=7"])
    assert cfg.sources[0].num_docs == 7
    with pytest.raises(ConfigError, match="not an index"):
        load_config(PrepareConfig, os.path.join(REPO, "configs/prepare-synthetic.yaml"), ["sources.3.seed=1"])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PretrainConfig, None, ["corpus"])


def test_config_roundtrips_through_plain_dict():
    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs/gpt-tiny.yaml"))
    assert PretrainConfig.model_validate(cfg.to_dict()) == cfg


def config_class(filename: str):
    """Which job a shipped config is for, by its name; a config nobody claims fails the test."""
    stem = os.path.basename(filename)
    if stem.startswith("prepare-"):
        return PrepareConfig
    if stem.split("-")[0] in ("gpt", "gpt2", "llama", "bert", "roberta", "albert"):
        return PretrainConfig
    if stem.startswith("finetune-"):
        return FinetuneConfig
    if stem.startswith("tune-"):
        return SweepConfig
    if stem.startswith("evaluate-"):
        from cluster.stages.evaluate import EvaluateConfig

        return EvaluateConfig
    if stem.startswith("distill-"):
        from cluster.stages.distill import DistillConfig

        return DistillConfig
    raise AssertionError(f"{stem}: no job claims this config; add it to config_class()")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))), ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(config_class(path), path)
    assert cfg.to_dict()
    if isinstance(cfg, SweepConfig):
        check_sweep(cfg)  # search keys, metric and scheduler are valid before any trial


def test_test_modules_have_unique_basenames():
    """tests/ has no __init__.py, so pytest imports test modules by basename: two modules with
    the same name in unit/ and integration/ stop collection ("import file mismatch"), which once
    turned CI red after a clean local run that had the other module cached."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).parents[1].rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]


def test_saved_config_compares_with_todays_defaults():
    import yaml

    cfg = load_config(SweepConfig, os.path.join(REPO, "configs/tune-topic-tiny.yaml"))
    saved = cfg.to_dict()
    assert same_config(yaml.safe_dump(saved), cfg)
    # written before a field existed: the field's default fills in, so it is the same config
    # (regression: the demo's sweep refused to resume after train.next_epoch_ahead was added)
    del saved["finetune"]["train"]["next_epoch_ahead"]
    assert same_config(yaml.safe_dump(saved), cfg)
    changed = cfg.to_dict()
    changed["finetune"]["train"]["seed"] += 1
    assert not same_config(yaml.safe_dump(changed), cfg)
    gone = cfg.to_dict()
    gone["finetune"]["train"]["removed_since"] = 1
    assert not same_config(yaml.safe_dump(gone), cfg)
    assert not same_config("finetune: [unclosed", cfg)


def test_one_string_stands_for_a_list_of_one(tmp_path):
    # `train: data/qa.jsonl` in YAML, or a single name on the command line, was refused as
    # "Input should be a valid list"; a list still works, and a non-string still fails by key.
    path = tmp_path / "ft.yaml"
    path.write_text("task: completion\nmodel: {checkpoint: m}\ndata: {kind: files, train: data/qa.jsonl}\n")
    cfg = load_config(FinetuneConfig, path, ["data.validation=data/v.jsonl",
                                             "strategy.lora.target_modules=c_attn"])
    assert cfg.data.train == ["data/qa.jsonl"] and cfg.data.validation == ["data/v.jsonl"]
    assert cfg.strategy.lora.target_modules == ["c_attn"]
    assert load_config(FinetuneConfig, path, ["data.train=[a.csv, b.csv]"]).data.train == ["a.csv", "b.csv"]
    with pytest.raises(ConfigError, match="'data.train'"):
        load_config(FinetuneConfig, path, ["data.train=3"])
    prep = load_config(PrepareConfig, None, ["sources=[{kind: files, paths: notes.txt}]", "clean.charsets=latin"])
    assert prep.sources[0].paths == ["notes.txt"] and prep.clean.charsets == ["latin"]
    from serve.options import AppArgs

    assert AppArgs.model_validate({"models": "bert-cls"}).models == ["bert-cls"]
    # registry names hold no comma: `--set models=a,b` is two models, as a comma-separated flag is
    assert build(AppArgs, parse_overrides(["models=w2,opt"])).models == ["w2", "opt"]
    assert AppArgs.model_validate({"models": ["a, b", "c"]}).models == ["a", "b", "c"]


def test_fsdp_across_cpu_workers_is_accepted_and_sharded_generation_is_refused():
    """FSDP2 shards over gloo on CPU workers as over NCCL on GPUs: no config refuses it for lack of
    a GPU. Completion fine-tuning generates per rank during evaluation, which a sharded model's
    collectives cannot follow, so that combination is refused when the config is read."""
    load_config(PretrainConfig, None, ["corpus=c", "scaling.num_workers=2", "scaling.strategy=fsdp"])
    sweep = ["finetune={task: classification, model: {checkpoint: x}, scaling: {strategy: fsdp}}",
             "search={optim.lr: {choice: [0.001]}}", "trial.workers=2"]
    check_sweep(load_config(SweepConfig, None, sweep))
    completion = {"task": "completion", "model": {"checkpoint": "x"}, "scaling": {"strategy": "fsdp", "num_workers": 2}}
    with pytest.raises(ValidationError, match="generation with a model sharded across workers"):
        FinetuneConfig.model_validate(completion)
    FinetuneConfig.model_validate({**completion, "scaling": {"strategy": "fsdp", "num_workers": 1}})
