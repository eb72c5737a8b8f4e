"""Knowledge distillation as an objective around any task objective (Hinton et al. 2015; DistilBERT).

`Distill` runs the task objective on the student unchanged (its loss, metrics and evaluation), sees
the student's logits as the task objective's own forward produced them, runs the frozen teacher on
the same inputs and adds the soft-target term:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

T^2 keeps the soft term's gradients on the scale of the hard term's as T grows. With `hidden` > 0
the mean squared error between both models' last hidden states is added at that weight, as
DistilBERT's cosine term aligns them; a student narrower or wider than its teacher carries a learned
linear map from its width to the teacher's (`attach_projection`, TinyBERT's W_h), trained with it
and kept out of its exported weights (cluster.train.checkpoint's train-only weights). For
per-token logits (tagging, completion, causal language models) the KL is averaged over the
positions the attention mask keeps; with `positions="labels"` (masked LM) over the positions the
task scores (labels != -100, the masked tokens: DistilBERT's `restrict_ce_to_mask`), since at the
others both models mostly copy the input. A sentence-pair head (NSP/SOP) learns from its own labels
only. Evaluation is the task objective's alone: validation metrics compare with a model trained
without a teacher.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from cluster.train.checkpoint import TRAIN_ONLY
from cluster.train.placement import unwrap

# the student's submodule mapping its hidden states to the teacher's width (hidden-state term)
PROJECTION = "distill_projection"


def attach_projection(student: torch.nn.Module, teacher_width: int, seed: int) -> None:
    """A learned linear map from the student's width to the teacher's, as a submodule of the student:
    the optimizer, DDP and checkpoints (resume) see it as any of its weights, and it is marked
    train-only, so the exported checkpoint is the student alone."""
    width = student.config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # every rank starts from the same map
        student.add_module(PROJECTION, torch.nn.Linear(width, teacher_width, bias=False))
    setattr(student, TRAIN_ONLY, (*getattr(student, TRAIN_ONLY, ()), f"{PROJECTION}."))


class _Recorder:
    """The student as the task objective calls it, keeping the call's inputs and output."""

    def __init__(self, model: Any, hidden_states: bool = False):
        self._model, self._hidden_states = model, hidden_states
        self.kwargs: dict[str, Any] | None = None
        self.output: Any = None

    def __call__(self, **kwargs: Any) -> Any:
        if self._hidden_states:
            kwargs = {**kwargs, "output_hidden_states": True}
        self.kwargs = kwargs
        self.output = self._model(**kwargs)
        return self.output

    def __getattr__(self, name: str) -> Any:  # `training`, `config`, ...: the model's own
        return getattr(self._model, name)


def soft_target_nats(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed KL(teacher || student) at `temperature`, in nats; the number of positions summed).
    Logits are (..., C); `mask` (the logits' leading shape) keeps positions where it is nonzero."""
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (...)
    if mask is not None:
        keep = mask.to(kl.dtype)
        return (kl * keep).sum(), keep.sum()
    return kl.sum(), torch.tensor(float(kl.numel()), device=kl.device)


def hidden_state_sq_error(student: torch.Tensor, teacher: torch.Tensor,
                          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed mean-over-width squared error between two (batch, positions, width) hidden states;
    the number of positions summed). `mask` (batch, positions) keeps positions where it is nonzero."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states of shapes {tuple(student.shape)} and {tuple(teacher.shape)}: the hidden-state "
                         "term needs the teacher's width")
    err = (student.float() - teacher.float()).pow(2).mean(-1)  # (batch, positions)
    if mask is not None:
        keep = mask.to(err.dtype)
        return (err * keep).sum(), keep.sum()
    return err.sum(), torch.tensor(float(err.numel()), device=err.device)


def _token_logits(output: Any) -> torch.Tensor:
    """The logits the soft targets compare: BERT's and ALBERT's pretraining heads call their token
    logits `prediction_logits` (beside the pair head's), every other head `logits`."""
    return output.prediction_logits if hasattr(output, "prediction_logits") else output.logits


class Distill:
    """`inner` (a task objective) with `teacher`'s soft targets (and with `hidden` > 0 its last hidden
    state) added to its training loss. With no teacher (or alpha and hidden 0) it is `inner`
    exactly: the student trained alone, for comparison."""

    def __init__(self, inner: Any, teacher: torch.nn.Module | None, alpha: float, temperature: float,
                 hidden: float = 0.0, positions: Literal["attention", "labels"] = "attention",
                 teacher_autocast: torch.dtype | None = None):
        self.inner, self.teacher = inner, teacher
        self.alpha, self.temperature, self.hidden, self.positions = alpha, temperature, hidden, positions
        # the training precision's autocast dtype: the loop's autocast already covers the teacher under
        # DDP (this one then changes nothing); under FSDP the loop computes in the student's bf16 policy
        # without autocast, and the teacher, not sharded, would otherwise run in fp32
        self.teacher_autocast = teacher_autocast
        self.name, self.metrics = inner.name, getattr(inner, "metrics", ())

    def __getattr__(self, name: str) -> Any:  # `generate`, `sample_limit`, `score_samples` when inner has them
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def collate(self, batch: dict[str, Any], seed: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return self.inner.collate(batch, seed)

    def forward(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.teacher is None or (self.alpha == 0 and self.hidden == 0) or not model.training:
            return self.inner.forward(model, inputs)
        student = _Recorder(model, hidden_states=self.hidden > 0)
        task_loss, stats = self.inner.forward(student, inputs)
        if student.kwargs is None:
            raise RuntimeError(f"objective '{self.name}' did not call the model: nothing to distil")
        device = next(self.teacher.parameters()).device.type
        with torch.no_grad(), torch.autocast(device, dtype=self.teacher_autocast or torch.float32,
                                             enabled=self.teacher_autocast is not None):
            teacher_out = self.teacher(**student.kwargs)
        logits, teacher_logits = _token_logits(student.output), _token_logits(teacher_out)
        mask = None
        if logits.dim() == 3:
            mask = inputs["labels"] != -100 if self.positions == "labels" else student.kwargs.get("attention_mask")
        nats, count = soft_target_nats(logits, teacher_logits, self.temperature, mask)
        soft = nats / count.clamp(min=1)
        loss = self.alpha * self.temperature ** 2 * soft + (1 - self.alpha) * task_loss
        out = {**stats, "kd_nats": nats.detach(), "kd_positions": count}
        if self.hidden > 0:
            states = student.output.hidden_states[-1]
            projection = getattr(unwrap(model), PROJECTION, None)
            if projection is not None:
                states = projection(states)
            sq, n = hidden_state_sq_error(states, teacher_out.hidden_states[-1], student.kwargs.get("attention_mask"))
            loss = loss + self.hidden * sq / n.clamp(min=1)
            out.update({"kd_hidden_sq": sq.detach(), "kd_hidden_positions": n})
        return loss, out

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = self.inner.summarize({k: v for k, v in sums.items() if not k.startswith("kd_")})
        if sums.get("kd_positions"):
            out["kd"] = sums["kd_nats"] / sums["kd_positions"]  # KL at T, nats per position
        if sums.get("kd_hidden_positions"):
            out["kd_hidden_mse"] = sums["kd_hidden_sq"] / sums["kd_hidden_positions"]
        return out
