"""Models built from config with transformers (random init, nothing downloaded).

Model construction lives here; placement (devices, DDP/FSDP, precision) lives in cluster.train.
Sizes are named presets from `tiny` (CPU, seconds) to GPT-2 124M / BERT-base (GPU); any field can
be overridden in the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from cluster.config import Section

if TYPE_CHECKING:
    from transformers import PreTrainedModel



Family = Literal["gpt2", "llama", "bert", "roberta", "albert"]


CAUSAL = ("gpt2", "llama")


ENCODERS = ("bert", "roberta", "albert")


# name -> (n_layer, n_head, d_model, d_ff)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 4, 128, 512),
    "mini": (4, 4, 256, 1024),
    "small": (6, 8, 512, 2048),
    "124m": (12, 12, 768, 3072),  # GPT-2 small / BERT-base shape
    "350m": (24, 16, 1024, 4096),
}


class ModelConfig(Section):
    family: Family = Field("gpt2", description="architecture: gpt2/llama (causal), bert/roberta/albert (encoder)")
    size: str = Field("tiny", description=f"preset shape: {', '.join(SIZES)}; fields below override it")
    n_layer: int | None = Field(None, ge=1, description="transformer blocks")
    n_head: int | None = Field(None, ge=1, description="attention heads")
    d_model: int | None = Field(None, ge=8, description="hidden width")
    d_ff: int | None = Field(None, ge=8, description="feed-forward width")
    max_len: int = Field(128, ge=8, description="context length (position embeddings)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residuals")
    embedding_size: int = Field(64, ge=8, description="albert: factorised embedding width")
    tie_embeddings: bool = Field(True, description="share input and output embeddings")
    attn: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel")
    activation_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the model")

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.size not in SIZES:
            raise ValueError(f"unknown size '{self.size}' (known: {', '.join(SIZES)})")
        n_layer, n_head, d_model, _ = self.shape()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        return self

    def shape(self) -> tuple[int, int, int, int]:
        base = SIZES[self.size]
        return (
            self.n_layer or base[0],
            self.n_head or base[1],
            self.d_model or base[2],
            self.d_ff or base[3],
        )

    @property
    def is_causal(self) -> bool:
        return self.family in CAUSAL


def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]) -> Any:
    """The transformers config object for `cfg` (saved with every checkpoint)."""
    # transformers is imported where it is used: a job's driver validates ModelConfig but never
    # builds a model, and importing transformers there costs ~2 s of time-to-first-step.
    from transformers import AlbertConfig, BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    n_layer, n_head, d_model, d_ff = cfg.shape()
    common = {"vocab_size": vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.family == "gpt2":
        return GPT2Config(
            n_layer=n_layer, n_head=n_head, n_embd=d_model, n_inner=d_ff, n_positions=cfg.max_len,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
            **common,
        )
    if cfg.family == "llama":
        return LlamaConfig(
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            hidden_size=d_model, intermediate_size=d_ff, max_position_embeddings=cfg.max_len,
            attention_dropout=cfg.dropout, bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
            pad_token_id=special.get("pad"), **common,
        )
    encoder = {
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "hidden_size": d_model,
        "intermediate_size": d_ff, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "pad_token_id": special.get("pad"),
        "type_vocab_size": 2, **common,
    }
    if cfg.family == "bert":
        return BertConfig(max_position_embeddings=cfg.max_len, **encoder)
    if cfg.family == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, so it needs that many extra slots.
        pad = special.get("pad") or 0
        return RobertaConfig(max_position_embeddings=cfg.max_len + pad + 2, **encoder)
    return AlbertConfig(
        max_position_embeddings=cfg.max_len, embedding_size=cfg.embedding_size,
        num_hidden_groups=1, inner_group_num=1, classifier_dropout_prob=cfg.dropout, **encoder,
    )


def build_model(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None], seed: int = 0) -> PreTrainedModel:
    """A randomly initialised pretraining model (seeded, so every rank starts identical)."""
    import torch
    from transformers import (
        AlbertForPreTraining,
        BertForPreTraining,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        RobertaForMaskedLM,
    )

    classes = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "bert": BertForPreTraining,
               "roberta": RobertaForMaskedLM, "albert": AlbertForPreTraining}
    torch.manual_seed(seed)
    config = hf_config(cfg, vocab_size, special)
    config._attn_implementation = cfg.attn
    model = classes[cfg.family](config)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: Any) -> None:
    """transformers 5.24 renamed gradient_checkpointing_enable (deprecated, FutureWarning from every
    worker) to activation_checkpointing_enable; older versions have only the first."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
    }
