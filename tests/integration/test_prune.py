"""`raylm prune` on the shared local Ray: a fine-tuned Llama topic classifier loses a quarter of its
attention heads, the smaller checkpoint loads with transformers alone and is scored before and after;
a family whose config cannot hold fewer heads is refused before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from cluster.config import load_config
from cluster.stages.finetune import FinetuneConfig
from jobs import finetune as finetune_job
from jobs import prune as prune_job
from tests.conftest import PYTHON, REPO, subprocess_env


@pytest.fixture(scope="module")
def llama_classifier(gpt_corpus, tmp_path_factory):
    """A 2-block Llama (4 heads of 12 on a 48-wide stream) on the corpus's tokenizer, fine-tuned
    for topics from random weights."""
    from transformers import PreTrainedTokenizerFast

    from cluster.train.models import ModelConfig, build_model, special_ids

    base = str(tmp_path_factory.mktemp("llama-base"))
    tok = PreTrainedTokenizerFast.from_pretrained(gpt_corpus.tokenizer_path)
    model = build_model(ModelConfig(family="llama", n_layer=2, n_head=4, d_model=48, d_ff=96, max_len=128), len(tok),
                        special_ids(tok))
    model.save_pretrained(base)
    tok.save_pretrained(base)
    cfg = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune-topic-tiny.yaml"),
                      ["name=t-prune-base", f"model.checkpoint={base}", "train.max_steps=80", "train.eval_every=40",
                       "train.checkpoint_every=40", "data.train_examples=1200", "data.validation_examples=160",
                       "train.eval_batches=10", "scaling.threads_per_worker=1"])
    finetune_job.run(cfg)
    return "t-prune-base"


def test_a_quarter_of_the_heads_go_and_the_smaller_checkpoint_loads_alone(llama_classifier, capsys):
    rc = prune_job.main([llama_classifier, "--heads", "0.25", "--name", "t-pruned",
                         "--set", "data.validation_examples=160", "--set", "importance_batches=4"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    with open(out.strip().splitlines()[-1]) as f:
        s = json.load(f)
    assert (s["heads"]["before"], s["heads"]["after"]) == (4, 3) and all(len(k) == 3 for k in s["heads"]["kept"])
    assert s["params"]["after"] < s["params"]["before"]
    assert s["before"]["accuracy"] > 0.5 and 0.0 <= s["after"]["accuracy"] <= 1.0
    assert s["final"]["metrics"]["val_accuracy"] == s["after"]["accuracy"]
    code = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        assert not any(m.startswith(("cluster", "ray")) for m in sys.modules)
        path = {s['final']['checkpoint']!r}
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        print(model.config.num_attention_heads, sum(p.numel() for p in model.parameters()))
        print(model(**tok(["Shares of Vela Bank rose 12 percent."], return_tensors="pt")).logits.shape[-1])
    """)
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                         env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-2000:]
    (heads, params), (classes,) = (line.split() for line in run.stdout.strip().splitlines())
    assert (int(heads), int(params), int(classes)) == (3, s["params"]["after"], 4)


def test_a_gpt2_model_is_refused_before_ray_starts(gpt_base, capsys):
    rc = prune_job.main([gpt_base, "--heads", "0.25", "--name", "t-pruned-gpt"])
    assert rc == 1
    assert "is a gpt2 model: raylm prunes the attention heads of llama, mistral, qwen2" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "prune", "t-pruned-gpt"))
