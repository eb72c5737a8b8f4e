"""Finding and reading the checkpoints stages start from: a checkpoint directory or URI, a run
(its best checkpoint), a registry model or a hub id; its config.json, its family's fit for a task,
its tokenizer made ready for the task, and a local copy of one that lives in an object store.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

from cluster import hub, registry, storage
from cluster.errors import JobError
from cluster.runs import is_run_dir, run_checkpoint

# task -> transformers Auto class name, the registry task it publishes as, peft task type
TASKS: dict[str, tuple[str, str, str]] = {
    "classification": ("AutoModelForSequenceClassification", "classification", "SEQ_CLS"),
    "tagging": ("AutoModelForTokenClassification", "tagging", "TOKEN_CLS"),
    "completion": ("AutoModelForCausalLM", "generation", "CAUSAL_LM"),
}


CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def resolve_checkpoint(name: str, root: str | None = None) -> str:
    """A checkpoint directory (or URI, or hub id) for `model.checkpoint`: a pretraining run, by name
    or by its folder, stands for its best checkpoint (else its final one)."""
    if storage.exists(name) or storage.is_uri(name):
        return (run_checkpoint(name) or name) if is_run_dir(name) else name
    base = root or storage.storage_root()
    picked = run_checkpoint(storage.join(base, "pretrain", name))
    if picked:
        return picked
    published = registry.find(name, storage.join(base, "registry"))
    if published is not None:
        return published["path"]  # the current version's folder
    if name.startswith((".", "/")):
        raise JobError(f"model.checkpoint '{name}' does not exist")
    return name  # a hub id such as "bert-base-uncased": transformers fetches it (base_config says if it cannot)


@functools.lru_cache(maxsize=8)
def local_copy(path: str) -> str:
    """from_pretrained reads local folders: copy a URI checkpoint here (once per process)."""
    if not storage.is_uri(path):
        return path
    import tempfile

    local = tempfile.mkdtemp(prefix="raylm-base-")
    registry.copy_tree(path, local)
    return local


def base_config(path: str, key: str = "model.checkpoint", runs: str = "a pretrain run") -> dict[str, Any]:
    """The config.json of the checkpoint `key` names (a local folder or a hub id); `runs` says
    which run names `key` accepts, for the message when it is none of them."""
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise JobError(f"{key} '{path}' has no config.json: not a Hugging Face checkpoint")
        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise JobError(f"{key} '{path}' has no *.safetensors weights (pickled weights are never loaded)")
        with open(config_file) as f:
            return json.load(f)
    from transformers import AutoConfig

    with hub.offline_if_unreachable() as unresolved:
        try:
            # With no hub to reach, only the local Hugging Face cache can hold it: look there alone.
            return AutoConfig.from_pretrained(path, local_files_only=unresolved is not None).to_dict()
        except Exception as exc:  # offline, or no such hub model
            raise JobError(
                f"{key} '{path}' is not a checkpoint directory, {runs} or registry model under "
                f"RAYLM_STORAGE, nor loadable from the Hugging Face hub ({hub.offline_note(unresolved) or type(exc).__name__})"
            ) from None


def check_family(task: str, config: dict[str, Any], where: str) -> None:
    """A checkpoint of the wrong family for the task is refused before training starts."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if task == "completion":
        if not any(a.endswith(CAUSAL_ARCHITECTURES) for a in archs):
            raise JobError(
                f"task 'completion' needs a causal language model checkpoint; '{where}' is {archs or model_type} "
                "(an encoder: use it for classification or tagging)"
            )
        return
    mapping = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if task == "classification"
               else auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in mapping:
        raise JobError(f"task '{task}': checkpoint '{where}' (model_type '{model_type}') has no {TASKS[task][0]} head")


def prepare_tokenizer(path: str, task: str, pair: bool, token_types: bool = False) -> Any:
    """The base checkpoint's tokenizer, ready for the task: a pad token; for text pairs on a
    tokenizer without a pair template (byte-level BPE), "A <eos> B"; token_type_ids in its outputs
    when the model has segment embeddings. Saved with the fine-tuned checkpoint, so Serve and
    `pipeline` encode inputs exactly as training did."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = hub.from_pretrained(AutoTokenizer.from_pretrained, path)
    if not tok.is_fast:
        raise JobError(f"model.checkpoint '{path}': raylm needs a fast (Rust) tokenizer, got {type(tok).__name__}")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise JobError(f"model.checkpoint '{path}': the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if task == "completion" and tok.eos_token_id is None:
        raise JobError(f"task 'completion': the tokenizer of '{path}' has no eos token to end completions")
    if pair and tok("a", "b")["input_ids"] == tok("a")["input_ids"] + tok("b")["input_ids"]:
        sep = tok.sep_token or tok.eos_token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A", pair=f"$A {sep} $B:1", special_tokens=[(sep, tok.convert_tokens_to_ids(sep))]
        )
    if token_types and "token_type_ids" not in tok.model_input_names:
        names = ["input_ids", "token_type_ids", "attention_mask"]
        tok.model_input_names = names
        tok.init_kwargs["model_input_names"] = names  # saved in tokenizer_config.json
    return tok
