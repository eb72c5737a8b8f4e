"""int8 serving without Ray: GPT-2's Conv1D layers become equivalent Linears, the quantized model
answers as the fp32 one does, the option reaches the engine from Serve's options and from the
registry entry, and a GPU is refused with a message."""

from __future__ import annotations

import pytest
import torch

from cluster import registry
from cluster.config import ConfigError, build
from cluster.quantize import check_mode, linear_from_conv1d, quantize, quantized_linears
from serve import engines, tiny
from serve.options import AppArgs, DeploymentOptions


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("q")
    reg = str(base / "reg")
    registry.publish(tiny.save_gpt(str(base / "gpt")), "g", "generation", root=reg)
    registry.publish(tiny.save_bert(str(base / "cls"), "classification"), "c", "classification", root=reg)
    registry.publish(tiny.save_bert(str(base / "cls"), "classification"), "c8", "classification", root=reg,
                     quantize="int8")
    return reg


def test_gpt2_conv1d_layers_become_linears_that_compute_the_same(published):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(registry.load_entry("g", published)["path"]).eval()
    ids = torch.randint(0, 300, (2, 12))
    before = model(input_ids=ids).logits
    assert linear_from_conv1d(model) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    q = quantize(model, "int8", torch.device("cpu"), "t")
    assert quantized_linears(q) == 9  # and the LM head
    assert (q(input_ids=ids).logits.argmax(-1) == before.argmax(-1)).float().mean() >= 0.9


def test_an_engine_loads_int8_from_its_option_or_its_published_default(published):
    plain = engines.load(registry.load_entry("c", published))
    int8 = engines.load(registry.load_entry("c", published), "int8")
    default = engines.load(registry.load_entry("c8", published))
    overridden = engines.load(registry.load_entry("c8", published), "none")
    assert [e.placement()["dtype"] for e in (plain, int8, default, overridden)] == ["float32", "int8", "int8", "float32"]
    assert quantized_linears(int8.model) > 0 and quantized_linears(plain.model) == 0
    texts = [f"the {w} went to the market on day {i}" for i, w in enumerate(["cat", "dog", "bird", "man"] * 5)]
    a, b = plain.classify(texts, [None] * len(texts)), int8.classify(texts, [None] * len(texts))
    # a random-init head: scores close together, so int8 rounding is compared on the scores themselves
    for x, y in zip(a, b, strict=True):
        fp32, q8 = ({s["label"]: s["score"] for s in r["scores"]} for r in (x, y))
        assert fp32.keys() == q8.keys() and max(abs(fp32[k] - q8[k]) for k in fp32) < 0.05


def test_int8_on_a_gpu_is_refused_naming_the_model_and_the_way_out():
    with pytest.raises(ValueError, match=r"registry model 'm': quantize 'int8' runs on CPU .*num_gpus: 0"):
        check_mode("int8", torch.device("cuda"), "registry model 'm'")
    assert check_mode(None, torch.device("cuda"), "m") == "none"
    with pytest.raises(ValueError, match="quantize 'int4' is not one of none, int8"):
        check_mode("int4", torch.device("cpu"), "m")
    with pytest.raises(ConfigError, match="quantize 'int8' runs on CPU replicas .* num_gpus is 1"):
        build(AppArgs, {"per_model": {}, "model": {"quantize": "int8", "num_gpus": 1}})
    with pytest.raises(ConfigError, match="quantize"):
        build(DeploymentOptions, {"quantize": "fp8"})


def test_serve_options_carry_quantize_to_the_replica_and_not_to_ray():
    args = build(AppArgs, {"per_model": {"c": {"quantize": "int8"}}})
    assert args.model_runtime("c")["quantize"] == "int8" and args.model_runtime("g")["quantize"] is None
    assert "quantize" not in args.options_for("c").serve_options()
    assert "quantize" not in args.options_for("c").serve_options()["ray_actor_options"]


def test_publish_records_quantize_and_refuses_an_unknown_one(published, tmp_path):
    assert registry.load_entry("c8", published)["quantize"] == "int8"
    assert registry.load_entry("c", published)["quantize"] == "none"
    with pytest.raises(registry.RegistryError, match="quantize 'int4' is not one of none, int8"):
        registry.publish(registry.load_entry("c", published)["path"], "x", "classification", root=str(tmp_path),
                         quantize="int4")
