"""Inference for each registry task, without Ray: the Serve deployments, the benchmark's
in-process baseline and the plain FastAPI baseline all call these.

Models load from safetensors only and never run remote code. Every method takes a batch. A
`Deadline` per request stops its generation between decoding steps, from whichever thread runs it.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from cluster import registry, storage
from cluster.quantize import check_mode
from cluster.quantize import quantize as quantize_model
from cluster.train.placement import inference_placement
from serve.schemas import GREEDY_BELOW, ApiError, Deadline

log = logging.getLogger("raylm.serve")

_AUTO = {
    "generation": AutoModelForCausalLM,
    "fill-mask": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
    "tagging": AutoModelForTokenClassification,
}


def load(entry: dict[str, Any], quantize: str | None = None) -> Engine:
    """The engine for a registry entry (model.json plus its `path`). `quantize` (the deployment's
    option) overrides the entry's own default (`raylm publish --quantize`); see cluster.quantize."""
    cls = GenerationEngine if entry["task"] == "generation" else EncoderEngine
    return cls(entry, quantize)


def describe(device: torch.device, dtype: torch.dtype, quantize: str = "none") -> dict[str, str]:
    """Where a model runs, as /v1/models shows it: {"device": "cuda", "dtype": "bfloat16"}; a model
    with int8 Linear layers shows "int8"."""
    return {"device": device.type, "dtype": quantize if quantize != "none" else str(dtype).removeprefix("torch.")}


def context_length(config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 1024


class _Halt(StoppingCriteria):
    """Stops the rows of prompts whose deadline passed, each prompt's `runs` rows together, and
    records which prompts it cut short (a row that already ended, on EOS or padding, is not)."""

    def __init__(self, deadlines: list[Deadline], runs: int, ended: tuple[int | None, ...]):
        self.deadlines, self.runs = deadlines, runs
        self.ended = torch.tensor([t for t in ended if t is not None], dtype=torch.long)
        self.halted: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        passed = torch.tensor([d.passed() for d in self.deadlines]).repeat_interleave(self.runs)
        running = ~torch.isin(input_ids[:, -1].cpu(), self.ended)
        for row in (passed & running).nonzero().flatten().tolist():
            self.halted.add(row // self.runs)
        return passed.to(input_ids.device)


class Engine:
    def __init__(self, entry: dict[str, Any], quantize: str | None = None):
        path = entry["path"]
        if storage.is_uri(path):  # from_pretrained reads local folders: copy the entry here first
            local = tempfile.mkdtemp(prefix=f"raylm-{entry['name']}-")
            registry.copy_tree(path, local)
            path = local
        # The whole file against the digest recorded at publish: a corrupted model is never served.
        registry.check_weights(path, entry.get("weights_sha256"), what=f"registry model '{entry['name']}'")
        self.name, self.task, self.path = entry["name"], entry["task"], path
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in every replica's log
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.device, self.dtype = inference_placement()
        where = f"registry model '{self.name}'"
        if quantize is None and entry.get("quantize", "none") != "none" and self.device.type != "cpu":
            # the published default is for CPU replicas; a GPU replica serves the model in its own dtype
            log.warning("%s: published with quantize '%s', which runs on CPU; serving it in %s on the %s",
                        where, entry["quantize"], str(self.dtype).removeprefix("torch."), self.device.type)
            quantize = "none"
        self.quantize = check_mode(quantize or entry.get("quantize"), self.device, where)  # before the weights load
        self.model = _AUTO[self.task].from_pretrained(path, use_safetensors=True, trust_remote_code=False,
                                                      dtype=self.dtype)
        self.model = quantize_model(self.model.to(self.device).eval(), self.quantize, self.device, where)
        self.context = context_length(self.model.config)
        if self.task == "fill-mask" and self.tokenizer.mask_token is None:
            raise ValueError(f"registry model '{self.name}' has a tokenizer without a mask token")
        # The seeded global RNG is shared by generate(); one sampling call at a time keeps seeds exact.
        self.lock = threading.Lock()

    def placement(self) -> dict[str, str]:
        return describe(self.device, self.dtype, self.quantize)

    def check_length(self, n_tokens: int, extra: int = 0, param: str = "prompt") -> None:
        if n_tokens + extra > self.context:
            what = f"{n_tokens} prompt tokens + {extra} max_tokens" if extra else f"{n_tokens} tokens"
            raise ApiError(400, f"{what} exceeds model '{self.name}' context length of {self.context} tokens",
                           param, "context_length_exceeded")


class GenerationEngine(Engine):
    def __init__(self, entry: dict[str, Any], quantize: str | None = None):
        super().__init__(entry, quantize)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        tok.padding_side = "left"  # decoder-only batches pad on the left so generation continues the text
        # The KV cache argument is `cache` from transformers 5.x (`past_key_values`, deprecated there
        # and removed in 5.40, before): streaming steps pass whichever this install takes.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt encodes to no tokens", "prompt", "empty_prompt")
        self.check_length(len(ids), max_tokens)
        return ids

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: dict[str, Any],
                 deadlines: list[Deadline] | None = None) -> list[list[dict[str, Any]] | None]:
        """Per prompt, `n` choices {text, finish_reason, tokens}; one padded batch, same params.
        A prompt whose deadline (`deadlines`, one per prompt) passes mid-way is stopped at the next
        step and answered None; the others go on."""
        n, greedy = params["n"], params["temperature"] < GREEDY_BELOW
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs: dict[str, Any] = {"do_sample": not greedy, "top_k": None}
        if not greedy:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"])
        # Greedy decoding gives every choice the same text, and transformers refuses
        # num_return_sequences > 1 without sampling: decode once, answer it n times.
        runs = 1 if greedy else n
        halt = _Halt(deadlines, runs, (self.eos_id, self.pad_id)) if deadlines else None
        with self.lock:
            if params.get("seed") is not None:
                torch.manual_seed(params["seed"])
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=params["max_tokens"],
                num_return_sequences=runs, pad_token_id=self.pad_id, eos_token_id=self.eos_id, use_cache=True,
                stopping_criteria=StoppingCriteriaList([halt]) if halt else None, **kwargs,
            )
        results: list[list[dict[str, Any]] | None] = []
        for i in range(len(prompts)):
            if halt and i in halt.halted:
                results.append(None)
                continue
            choices = []
            for j in range(n):
                new = out[i * runs + j % runs, width:].tolist()
                choices.append(self._finish(new, params))
            results.append(choices)
        return results

    def _finish(self, new: list[int], params: dict[str, Any]) -> dict[str, Any]:
        if self.eos_id in new:
            new, reason = new[: new.index(self.eos_id)], "stop"
        else:
            new = [t for t in new if t != self.pad_id]
            reason = "length" if len(new) >= params["max_tokens"] else "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, params.get("stop"))
        return {"text": text, "finish_reason": "stop" if stopped else reason, "tokens": len(new)}

    @torch.inference_mode()
    def stream(self, prompt: list[int], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield {text, finish_reason, tokens} deltas token by token (KV cache, one sequence)."""
        stops = params.get("stop") or []
        gen = torch.Generator().manual_seed(params["seed"]) if params.get("seed") is not None else None
        new: list[int] = []
        sent, past, step_ids, reason = "", None, torch.tensor([prompt], device=self.device), "length"
        for _ in range(params["max_tokens"]):
            out = self.model(input_ids=step_ids, use_cache=True, **{self.cache_arg: past})
            past = out[self.cache_arg]
            token = _sample(out.logits[0, -1], params["temperature"], params["top_p"], gen)
            if token == self.eos_id:
                reason = "stop"
                break
            new.append(token)
            step_ids = torch.tensor([[token]], device=self.device)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if "\ufffd" in text[len(sent):]:
                continue  # an incomplete multi-byte character; wait for the next token
            if _cut_at_stop(text, stops)[1]:
                reason = "stop"
                break
            # hold back only a tail that is the start of a stop string (it may complete it)
            ready = text[: len(text) - _stop_prefix_len(text, stops)]
            if len(ready) > len(sent):
                yield {"text": ready[len(sent):], "finish_reason": None, "tokens": len(new)}
                sent = ready
        final = _cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stops)[0]
        if len(final) > len(sent):
            yield {"text": final[len(sent):], "finish_reason": None, "tokens": len(new)}
        yield {"text": "", "finish_reason": reason, "tokens": len(new)}


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    # on the CPU, in fp32: the seeded generator is a CPU one, and bf16 probabilities are too coarse
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        keep[0] = True  # the most likely token, even when top_p underflows float32 (2e-311 -> 0)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (0: nothing to hold)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops or [] if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class EncoderEngine(Engine):
    def __init__(self, entry: dict[str, Any], quantize: str | None = None):
        super().__init__(entry, quantize)
        id2label = self.model.config.id2label or {}
        self.labels = entry.get("labels") or [id2label[i] for i in sorted(id2label)]

    def _encode(self, texts: list[str], pairs: list[str | None] | None = None) -> Any:
        pairs = pairs or [None] * len(texts)
        if all(p is None for p in pairs):
            enc = self.tokenizer(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
        else:  # items are encoded one by one because a batch may mix single texts and pairs
            items = [self.tokenizer(t, p) if p is not None else self.tokenizer(t) for t, p in zip(texts, pairs, strict=False)]
            enc = self.tokenizer.pad(items, return_tensors="pt")
        # padded to the longest input, so the width is its length (checked before the model sees it)
        self.check_length(enc["input_ids"].shape[-1], param="inputs")
        return enc

    def _forward(self, enc: Any) -> torch.Tensor:
        """The model's logits for a tokenized batch, back on the CPU in fp32 (B, T, V) or (B, C)."""
        return self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float().cpu()

    def validate(self, texts: list[str], pairs: list[str | None] | None = None,
                 max_masks: int | None = None) -> list[int]:
        """Check one request's inputs before they join a batch, so a bad one fails alone; returns
        each input's length in tokens. Fill-mask inputs need a mask token, and at most `max_masks`."""
        if self.task == "fill-mask" and any(self.tokenizer.mask_token not in t for t in texts):
            raise ApiError(400, f"each input must contain the mask token {self.tokenizer.mask_token}",
                           "inputs", "no_mask")
        lengths = []
        for i, (t, p) in enumerate(zip(texts, pairs or [None] * len(texts), strict=False)):
            ids = (self.tokenizer(t, p) if p is not None else self.tokenizer(t))["input_ids"]
            self.check_length(len(ids), param="inputs")
            masks = ids.count(self.tokenizer.mask_token_id) if self.task == "fill-mask" else 0
            if max_masks is not None and masks > max_masks:
                raise ApiError(400, f"input {i} holds {masks} mask tokens; this server takes at most {max_masks} per "
                               "input (max_masks_per_input)", "inputs", "too_many_masks")
            lengths.append(len(ids))
        return lengths

    @torch.inference_mode()
    def fill_mask(self, texts: list[str], top_k: list[int]) -> list[list[dict[str, Any]]]:
        self.validate(texts)
        mask_id = self.tokenizer.mask_token_id
        enc = self._encode(texts)
        enc.pop("offset_mapping")
        logits = self._forward(enc)
        results = []
        for i, ids in enumerate(enc["input_ids"]):
            per_mask = []
            for pos in (ids == mask_id).nonzero().flatten().tolist():
                probs = logits[i, pos].softmax(-1)
                scores, tokens = probs.topk(min(top_k[i], probs.numel()))
                preds = []
                for score, token in zip(scores.tolist(), tokens.tolist(), strict=False):
                    filled = ids.clone()
                    filled[pos] = token
                    preds.append({"token": token, "token_str": self.tokenizer.decode([token]).strip(),
                                  "score": score, "sequence": self.tokenizer.decode(filled, skip_special_tokens=True)})
                per_mask.append({"position": pos, "predictions": preds})
            results.append(per_mask)
        return results

    @torch.inference_mode()
    def classify(self, texts: list[str], pairs: list[str | None]) -> list[dict[str, Any]]:
        enc = self._encode(texts, pairs)
        enc.pop("offset_mapping", None)
        probs = self._forward(enc).softmax(-1)
        results = []
        for row in probs.tolist():
            scores = sorted(({"label": self.labels[k], "score": s} for k, s in enumerate(row)),
                            key=lambda x: -x["score"])
            results.append({"label": scores[0]["label"], "score": scores[0]["score"], "scores": scores})
        return results

    @torch.inference_mode()
    def tag(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        enc = self._encode(texts)
        offsets = enc.pop("offset_mapping")
        probs = self._forward(enc).softmax(-1)
        results = []
        for i, text in enumerate(texts):
            words, seen = [], set()
            for t, word in enumerate(enc.word_ids(i)):
                if word is None or word in seen:
                    continue  # special/padding tokens and continuation sub-tokens
                seen.add(word)
                score, label = probs[i, t].max(-1)
                start, end = (int(x) for x in offsets[i, t])
                # the word ends where its last sub-token ends
                for t2 in range(t + 1, len(enc.word_ids(i))):
                    if enc.word_ids(i)[t2] != word:
                        break
                    end = int(offsets[i, t2][1])
                # Byte-level BPE words carry the whitespace before them (" Ito"), and a run of spaces
                # can be a word of its own: spans cover the word's text only.
                while start < end and text[start].isspace():
                    start += 1
                while end > start and text[end - 1].isspace():
                    end -= 1
                if start < end:
                    words.append((self.labels[int(label)], start, end, float(score)))
            results.append(aggregate_bio(text, words))
        return results


def aggregate_bio(text: str, words: list[tuple[str, int, int, float]]) -> list[dict[str, Any]]:
    """Merge per-word (label, start, end, score) into entities: B-X starts, I-X continues the same
    type, O ends; plain labels (no B-/I-) merge when adjacent words share them."""
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for label, start, end, score in words:
        prefix, _, kind = label.partition("-") if label[:2] in ("B-", "I-") else ("", "", label)
        if label == "O" or not kind:
            current = None
            continue
        if current is not None and current["label"] == kind and prefix != "B":
            current["end"] = end
            current["scores"].append(score)
        else:
            current = {"label": kind, "start": start, "end": end, "scores": [score]}
            entities.append(current)
    return [{"label": e["label"], "text": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"],
             "score": sum(e["scores"]) / len(e["scores"])} for e in entities]
