"""Head pruning without Ray: gradient importance finds a head that does nothing, the pruned model
computes what the full one does with those heads switched off, it reloads from its own config, and
families or attention layouts it cannot describe are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from cluster.errors import JobError
from cluster.objectives.tasks import SequenceClassification
from cluster.stages import prune as P


def llama(heads: int = 4, layers: int = 2) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(  # 48 wide: 4, 3 and 2 heads of 12 divide it
        vocab_size=60, hidden_size=48, intermediate_size=64, head_dim=12, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=32, num_labels=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 60, (4, 10), generator=g), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


TASK = SequenceClassification(["a", "b", "c"], pad_id=0, token_types=False)


def test_a_head_that_contributes_nothing_is_the_least_important_and_is_removed():
    model = llama()
    with torch.no_grad():  # layer 1, head 2 writes nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * 12: 3 * 12] = 0
    importance = P.head_importance(model, TASK, batches())
    assert importance.shape == (2, 4) and float(importance[1, 2]) == 0.0
    assert torch.allclose(importance.norm(dim=1), torch.ones(2))
    assert all(p.requires_grad is False for p in model.parameters())
    keep = P.heads_to_keep(importance, P.removed_per_layer(model.config.to_dict(), 0.25, "m"))
    assert len(keep) == 2 and all(len(k) == 3 for k in keep) and 2 not in keep[1]
    assert P.removed_per_layer(model.config.to_dict(), 0.01, "m") == 1  # at least one
    assert P.removed_per_layer({"model_type": "mistral", "num_attention_heads": 4, "hidden_size": 48}, 0.99, "m") == 3


def test_a_head_count_llama_cannot_describe_is_refused_naming_what_fits():
    config = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 128}
    with pytest.raises(JobError, match="3 of 4 heads per layer would not divide hidden_size 128.*--heads 0.5 or 0.75 fits"):
        P.removed_per_layer(config, 0.25, "m")
    assert P.removed_per_layer(config, 0.5, "m") == 2


def test_the_pruned_model_computes_what_the_full_one_does_without_those_heads(tmp_path):
    model = llama()
    keep = [[0, 1, 3], [1, 2, 3]]
    small = P.pruned(model, keep)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (3, 3, 12)
    full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == full - 2 * 4 * 12 * 48  # q, k, v, o of one head per layer

    def silenced(layer: int, head: int):
        def hook(module, args):
            x = args[0].clone()
            x[..., head * 12: (head + 1) * 12] = 0
            return (x,)
        return model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)

    handles = [silenced(0, 2), silenced(1, 0)]
    inputs = batches(1)[0]
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        for h in handles:
            h.remove()
        got = small(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    small.save_pretrained(tmp_path)
    again = LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=inputs["input_ids"]).logits, small(input_ids=inputs["input_ids"]).logits,
                              atol=1e-5)


def test_families_whose_config_cannot_hold_fewer_heads_are_refused():
    with pytest.raises(JobError, match="is a gpt2 model: raylm prunes the attention heads of llama, mistral, qwen2"):
        P.check_prunable({"model_type": "gpt2", "num_attention_heads": 4}, "/m")
    with pytest.raises(JobError, match="grouped-query attention \\(2 key/value heads for 4\\)"):
        P.check_prunable({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}, "/m")
    P.check_prunable({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 4}, "/m")
