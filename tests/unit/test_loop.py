"""The training loop itself, without Ray: a stub session hands it batches and takes its reports.

What is checked here is what the GPU paths rely on and CPU can prove: the placement order (model
placed, then the optimizer built on it, then state restored onto it), gradient accumulation,
clipping, the learning-rate schedule's shape, and bf16 autocast."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from cluster.config import load_config
from cluster.objectives.lm import CausalLM
from cluster.stages.pretrain import PretrainConfig
from cluster.train.loop import Loop
from cluster.train.models import build_model, special_ids
from cluster.train.optim import lr_lambda
from cluster.train.plan import Plan

BLOCK = 32


class Rows:
    """One dataset's rows in order, served as Ray Data's `iter_batches` would (no shuffling)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False, **_):
        end = len(self.rows) - (len(self.rows) % batch_size if drop_last else 0)
        for i in range(0, end, batch_size):
            yield {"input_ids": self.rows[i:i + batch_size]}


class Checkpoint:
    def __init__(self, path: str):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(self.path)


class StubSession:
    """A one-process host for the loop. `prepare_model` returns a copy with new parameters, as a
    device move or FSDP's sharding replaces them: an optimizer built before it trains nothing."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, rows: np.ndarray, keep: str, resume_from: str | None = None):
        self.data = {"train_0": Rows(rows), "validation": Rows(rows[:16])}
        self.keep, self.resume_from = keep, resume_from
        self.placed: torch.nn.Module | None = None
        self.reports: list[dict] = []

    def checkpoint(self):
        return Checkpoint(self.resume_from) if self.resume_from else None

    def dataset(self, name: str):
        return self.data[name]

    def prepare_model(self, model, strategy, param_dtype):
        self.placed = copy.deepcopy(model)
        return self.placed

    def report(self, metrics, checkpoint_dir=None, dir_name=None):
        self.reports.append(metrics)
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, os.path.join(self.keep, dir_name))


def rows(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Token blocks with structure to learn: each row counts up from a random start."""
    starts = np.random.default_rng(seed).integers(0, vocab, size=(n, 1))
    return ((starts + np.arange(BLOCK)) % vocab).astype(np.int64)


def make_loop(tmp_path, tokenizer, data: np.ndarray, sets: list[str], resume_from: str | None = None):
    cfg = load_config(PretrainConfig, None, ["corpus=c", "name=t", "model.n_layer=2", "model.d_model=32",
                                             "model.n_head=2", "model.d_ff=64", f"model.max_len={BLOCK}", *sets])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(tokenizer), special_ids(tokenizer), seed=cfg.train.seed)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    plan = Plan(run_dir=str(tmp_path / "run"), tokenizer_dir="", tokenizer_hash="h", bytes_per_token=1.0,
                steps_per_epoch=len(data) // per_step, max_steps=cfg.train.max_steps, epochs=1,
                tokens_per_step=per_step * BLOCK, seq_len=BLOCK, progress=False)
    session = StubSession(data, str(tmp_path / "kept"), resume_from)
    return Loop(cfg, plan, CausalLM(1.0), model, tokenizer, session), session


def train_losses(run_dir) -> list[float]:
    rows_ = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["train_loss"] for r in rows_ if r.get("split") == "train"]


BASE = ["train.max_steps=20", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
        "train.shuffle_buffer=0", "train.next_epoch_ahead=false", "optim.warmup_steps=2", "optim.lr=0.003"]


def test_the_optimizer_holds_the_placed_parameters(tmp_path, tiny_tokenizer):
    loop, session = make_loop(tmp_path, tiny_tokenizer, rows(64, len(tiny_tokenizer)), BASE)
    placed = {id(p) for p in session.placed.parameters()}
    held = {id(p) for group in loop.optimizer.param_groups for p in group["params"]}
    assert loop.model is session.placed and held == placed


def test_a_resume_restores_weights_and_optimizer_onto_the_placed_model(tmp_path, tiny_tokenizer):
    data = rows(160, len(tiny_tokenizer))
    loop, session = make_loop(tmp_path / "a", tiny_tokenizer, data, [*BASE, "train.max_steps=6"])
    loop.run()
    ckpt = os.path.join(str(tmp_path / "a" / "kept"), "checkpoint_0000006")
    saved = {k: v.clone() for k, v in session.placed.state_dict().items()}
    saved_moments = {n: loop.optimizer.state[p]["exp_avg"].clone() for n, p in session.placed.named_parameters()}

    resumed, session2 = make_loop(tmp_path / "b", tiny_tokenizer, data, [*BASE, "train.max_steps=6"], resume_from=ckpt)
    resumed.resume()
    assert resumed.state.step == 6
    for name, value in session2.placed.state_dict().items():
        assert torch.equal(value, saved[name]), name
    for name, p in session2.placed.named_parameters():
        state = resumed.optimizer.state[p]  # keyed by the placed parameter itself
        assert torch.equal(state["exp_avg"], saved_moments[name]), name
        assert state["exp_avg"].device == p.device


def test_gradient_accumulation_follows_one_large_batch(tmp_path, tiny_tokenizer):
    data = rows(20 * 16, len(tiny_tokenizer))
    big, _ = make_loop(tmp_path / "big", tiny_tokenizer, data, [*BASE, "train.batch_size=16", "train.grad_accum=1"])
    big.run()
    small, _ = make_loop(tmp_path / "small", tiny_tokenizer, data, [*BASE, "train.batch_size=4", "train.grad_accum=4"])
    small.run()
    a, b = train_losses(tmp_path / "big" / "run"), train_losses(tmp_path / "small" / "run")
    assert len(a) == len(b) == 20
    assert a[-1] < a[0] * 0.9  # it learns, so the comparison means something
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) / x < 1e-4


def test_clipping_clips_the_gradient_the_optimizer_sees(tmp_path, tiny_tokenizer):
    loop, _ = make_loop(tmp_path, tiny_tokenizer, rows(64, len(tiny_tokenizer)), [*BASE, "train.max_grad_norm=0.01"])
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    loop.optimizer.register_step_pre_hook(record)
    batch = next(loop.session.dataset("train_0").iter_batches(16))
    loop.micro_step(loop.objective.collate(batch, (0, 0, 0, 0)), sync=True)
    reported = loop.optimizer_step()
    assert reported > 0.01  # the norm before clipping
    assert seen == [pytest.approx(0.01, rel=1e-3)]


def test_the_schedule_warms_up_linearly_then_decays_to_its_floor():
    cosine = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    decay = [cosine(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    linear = lr_lambda("linear", warmup=0, total=100, min_ratio=0.0)
    assert [linear(s) for s in (0, 25, 50, 100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    assert lr_lambda("constant", warmup=5, total=100, min_ratio=0.1)(50) == 1.0


def test_the_loop_applies_the_schedule_it_was_given(tmp_path, tiny_tokenizer):
    loop, _ = make_loop(tmp_path, tiny_tokenizer, rows(20 * 16, len(tiny_tokenizer)), [*BASE, "optim.warmup_steps=5"])
    loop.run()
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")
           if json.loads(line).get("split") == "train"]
    # each row's lr is the one the next step uses: after step s, the schedule's value at s
    expected = [0.003 * lr_lambda("cosine", 5, 20, 0.1)(s) for s in range(1, 21)]
    assert lrs == pytest.approx(expected)


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_tokenizer):
    loop, _ = make_loop(tmp_path, tiny_tokenizer, rows(20 * 16, len(tiny_tokenizer)), [*BASE, "train.precision=bf16"])
    assert loop.amp == torch.bfloat16
    loop.run()
    losses = train_losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] * 0.9
