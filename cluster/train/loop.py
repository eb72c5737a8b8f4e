"""The one training loop, run by every Ray Train worker: setup -> step -> evaluate -> checkpoint.

Objectives (cluster.objectives) decide what a batch means; this loop owns placement (device, DDP or
FSDP, precision), the optimiser and schedule, metrics, checkpoints and the data position that makes
a resumed run see the same blocks as an uninterrupted one.

Data position: with `preserve_order`, Ray Data's streaming split hands blocks to ranks in a fixed
order (each block to the rank that has received the fewest rows), and each epoch's order is seeded,
so (epoch, batches consumed) pins the exact rows. Resume skips that many batches: exact to one batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cluster import storage
from cluster.objectives.base import Objective
from cluster.train.batches import FirstBatchAhead, epoch_batches, next_epoch_ahead_at
from cluster.train.checkpoint import NONFINITE_FILE, TrainState, load_train_state, restore, save_checkpoint
from cluster.train.optim import apply_hyperparameters, build_optimizer
from cluster.train.placement import all_gather_objects, all_reduce_sum, autocast_dtype, is_fsdp, unwrap
from cluster.train.plan import Plan
from cluster.train.session import Session
from cluster.train.sink import REMOTE_FLUSH_S, MetricsSink, flops_per_token, peak_flops

if TYPE_CHECKING:  # annotations only: the job driver imports this module and needs no transformers
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)


class Loop:
    """One worker's training run. Built from plain dicts (configs cross the Ray boundary as dicts);
    everything about its host (Ray Train worker or Tune trial) goes through `session`. `ahead`, when
    given, is the first epoch's iterator, already started (see FirstBatchAhead)."""

    def __init__(self, cfg: Any, plan: Plan, objective: Objective, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerFast, session: Session, ahead: FirstBatchAhead | None = None):
        self.cfg, self.plan, self.objective, self.tokenizer = cfg, plan, objective, tokenizer
        self.session = session
        self.ahead = ahead
        # transformers draws a tqdm bar per checkpoint write ("Writing model shards") into a job log
        # that already has a line per log interval.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = flops_per_token(model, plan.seq_len)
        self.peak_flops = peak_flops(self.device)
        # The one placement order: the model is placed or sharded, then the optimizer is built on the
        # parameters that will train, then (`resume`) state is restored onto them.
        self.amp = autocast_dtype(cfg.train.precision, self.device)
        self.model = self.place(model)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, plan.max_steps, self.device)
        self.state = TrainState(tokenizer_hash=plan.tokenizer_hash)
        self.sink = MetricsSink(plan.run_dir, cfg.name, enabled=self.rank == 0,
                                max_steps=plan.max_steps if plan.progress else None)
        self.last_checkpoint_step = -1
        self._trace: storage.Appender | None = None  # train.trace_data's file, opened at the first batch

    # -- setup
    def resume(self) -> None:
        ckpt = self.session.checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = load_train_state(d)
            if state.tokenizer_hash != self.plan.tokenizer_hash:
                raise RuntimeError(
                    f"checkpoint at step {state.step} was trained with tokenizer {state.tokenizer_hash}, "
                    f"but the corpus uses {self.plan.tokenizer_hash}"
                )
            self.state = restore(d, self.model, self.optimizer, self.scheduler)
        apply_hyperparameters(self.optimizer, self.scheduler, self.cfg.optim)
        self.last_checkpoint_step = self.state.step
        # the metrics log shows where a restarted or re-submitted run picked up
        self.sink.log({"step": self.state.step, "epoch": self.state.epoch, "split": "resume",
                       "batches_in_epoch": self.state.batches_in_epoch, "time": time.time()})

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this worker's device: sharded with FSDP2, wrapped in DDP, or as it is. Under
        FSDP on a GPU its mixed-precision policy computes in bf16 and reduces in fp32, in place of
        autocast."""
        fsdp = self.cfg.scaling.strategy == "fsdp"
        placed = self.session.prepare_model(model, self.cfg.scaling.strategy, self.amp if fsdp else None)
        if is_fsdp(placed):
            self.amp = None
        return placed

    # -- one optimizer step over grad_accum micro-batches
    def micro_step(self, inputs: dict[str, torch.Tensor], sync: bool) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        ctx = contextlib.nullcontext()
        if is_fsdp(self.model):  # FSDP2 reduce-scatters gradients only on the step's last micro-batch
            unwrap(self.model).set_requires_gradient_sync(sync)
        elif not sync and hasattr(self.model, "no_sync"):  # DDP
            ctx = self.model.no_sync()
        with ctx, torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss, stats = self.objective.forward(self.model, inputs)
            (loss / self.cfg.train.grad_accum).backward()
        return stats

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # sharded gradients: the norm over every shard
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- evaluation over the whole validation split, reduced across ranks
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Metrics of the model in training, or of `model` (a distillation's teacher) on the same
        validation rows. Every rank calls it: the sums are reduced across ranks."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        shard = self.session.dataset("validation")
        sums: dict[str, float] = {}
        generate = getattr(self.objective, "generate", None)
        # generated samples are capped per run, split evenly over the ranks
        sample_cap = -(-getattr(self.objective, "sample_limit", 0) // self.world)
        samples: list = []
        for i, batch in enumerate(shard.iter_batches(batch_size=self.cfg.train.batch_size, batch_format="numpy")):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            inputs = self.objective.collate(batch, (self.cfg.train.seed, -1, i, self.rank))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                _, stats = self.objective.forward(model, inputs)
                if generate and len(samples) < sample_cap:
                    samples += generate(unwrap(model), inputs, sample_cap - len(samples))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        model.train(True if model is self.model else was_training)
        metrics = self.objective.summarize(all_reduce_sum(sums, self.device))
        if generate:
            metrics.update(self.objective.score_samples(all_gather_objects(samples)))
        return metrics

    # -- checkpoint via the session (with Ray Train every rank calls report: it is a barrier)
    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        metrics = {**metrics, "step": self.state.step, "epoch": self.state.epoch,
                   "trainable_params": self.trainable_params}
        if not checkpoint:
            self.session.report(metrics)
            return
        self.sink.flush()
        if self._trace is not None:
            self._trace.flush()
        tmp = tempfile.mkdtemp(prefix="raylm-ckpt-")
        try:
            # Every rank writes its optimizer shard; Ray Train puts every rank's files in one folder.
            save_checkpoint(tmp, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state,
                            self.cfg.to_dict(), self.rank)
            self.session.report(metrics, checkpoint_dir=tmp, dir_name=f"checkpoint_{self.state.step:07d}")
            self.last_checkpoint_step = self.state.step
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def batches(self, epoch: int):
        """This rank's micro-batches of `epoch`, skipping those consumed before a resume."""
        skip = self.state.batches_in_epoch if epoch == self.state.epoch else 0
        if self.ahead is not None and self.ahead.epoch == epoch:
            it, self.ahead = self.ahead, None
        else:
            it = epoch_batches(self.session, self.cfg.train, self.rank, epoch)
        for i, batch in enumerate(it):
            if i >= skip:
                yield i, batch

    def trace(self, epoch: int, index: int, batch: dict[str, np.ndarray]) -> None:
        import hashlib

        rows = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in batch["input_ids"]])
        digest = hashlib.sha1(rows.tobytes()).hexdigest()[:16]
        if self._trace is None:
            self._trace = storage.Appender(storage.join(self.plan.run_dir, "data_trace", f"rank-{self.rank}.jsonl"),
                                           every_s=REMOTE_FLUSH_S)
        self._trace.write(json.dumps({"epoch": epoch, "batch": index, "step": self.state.step, "hash": digest}) + "\n")

    def run(self) -> None:
        if self.cfg.model.compile:  # after restore: compiling wraps the module, not its parameters
            self.model = torch.compile(self.model)
        try:
            self._run()
        finally:  # rows held for an object store are written even when the loop raises
            if self._trace is not None:
                self._trace.flush()
            self.sink.close()

    def _run(self) -> None:
        cfg, plan, st = self.cfg.train, self.plan, self.state
        accum = cfg.grad_accum
        t_start = time.perf_counter()
        window = {"t0": time.perf_counter(), "wait": 0.0, "tokens": 0, "stats": {}, "steps": 0, "norm": 0.0}
        stopped_for_nan = None
        self.model.train()  # from_pretrained hands models over in eval mode (no dropout)
        if cfg.eval_at_start and st.step == 0:
            self.log_validation(self.evaluate(), checkpoint=False)
        for epoch in range(st.epoch, plan.epochs):
            if st.step >= plan.max_steps:
                break
            if epoch != st.epoch:
                st.epoch, st.batches_in_epoch = epoch, 0
            t_wait = time.perf_counter()
            micro = 0
            # the same index on every rank: see next_epoch_ahead_at
            ahead_at = next_epoch_ahead_at(plan, accum) if cfg.next_epoch_ahead and epoch + 1 < plan.epochs else None
            for i, batch in self.batches(epoch):
                window["wait"] += time.perf_counter() - t_wait
                if ahead_at is not None and i >= ahead_at:
                    self.ahead = FirstBatchAhead(epoch + 1, epoch_batches(self.session, cfg, self.rank, epoch + 1))
                    ahead_at = None
                inputs = self.objective.collate(batch, (cfg.seed, epoch, i, self.rank))
                if cfg.trace_data:
                    self.trace(epoch, i, batch)
                micro += 1
                stats = self.micro_step(inputs, sync=micro % accum == 0)
                for k, v in stats.items():
                    window["stats"][k] = window["stats"].get(k, 0.0) + float(v)
                n_tok = int(inputs["input_ids"].numel())
                window["tokens"] += n_tok
                st.tokens_seen += n_tok * self.world
                st.batches_in_epoch = i + 1
                if micro % accum:
                    t_wait = time.perf_counter()
                    continue
                window["norm"] = self.optimizer_step()
                st.step += 1
                window["steps"] += 1
                stopped_for_nan = self.after_step(window, t_start)
                if stopped_for_nan is not None or st.step >= plan.max_steps:
                    break
                t_wait = time.perf_counter()
            if stopped_for_nan is not None or st.step >= plan.max_steps:
                break
            # The epoch ended on rows; trailing micro-batches that did not fill a step are discarded.
            self.optimizer.zero_grad(set_to_none=True)
        if stopped_for_nan is None:
            self.finish()

    def after_step(self, window: dict, t_start: float) -> int | None:
        cfg, st = self.cfg.train, self.state
        # step 1 is always logged: its wall time is the run's time-to-first-step
        is_log = st.step % cfg.log_every == 0 or st.step == self.plan.max_steps or st.step == 1
        if is_log:
            summed = all_reduce_sum(window["stats"], self.device)
            metrics = self.objective.summarize(summed) if summed else {}
            if not math.isfinite(metrics.get("loss", 0.0)):
                return self.stop_for_nan(metrics)
            elapsed = time.perf_counter() - window["t0"]
            total_elapsed = time.perf_counter() - t_start
            tok_s = window["tokens"] / max(elapsed, 1e-9)
            steps_left = self.plan.max_steps - st.step
            row = {
                "step": st.step, "epoch": st.epoch, "split": "train",
                **{f"train_{k}": v for k, v in metrics.items()},
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": window["norm"],
                "tokens_per_s_worker": tok_s, "tokens_per_s": tok_s * self.world,
                "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                "elapsed_s": total_elapsed,
                "eta_s": elapsed / max(window["steps"], 1) * steps_left,
                "tokens_seen": st.tokens_seen,
                "time": time.time(),
            }
            if self.peak_flops:
                row["mfu"] = tok_s * self.flops_per_token / self.peak_flops
            self.sink.log(row)
            window.update(t0=time.perf_counter(), wait=0.0, tokens=0, stats={}, steps=0)
        is_eval = st.step % cfg.eval_every == 0 or st.step == self.plan.max_steps
        is_ckpt = st.step % cfg.checkpoint_every == 0 or st.step == self.plan.max_steps
        if is_eval or is_ckpt:
            val = self.evaluate()
            if not math.isfinite(val["loss"]):
                return self.stop_for_nan(val)
            self.log_validation(val, checkpoint=is_ckpt)
        return None

    def log_validation(self, val: dict[str, float], checkpoint: bool) -> None:
        st = self.state
        st.best_val_loss = min(st.best_val_loss, val["loss"])
        val_metrics = {f"val_{k}": v for k, v in val.items()}
        self.sink.log({"step": st.step, "epoch": st.epoch, "split": "validation", **val_metrics})
        st.history.append({"step": st.step, **val_metrics})
        self.report(val_metrics, checkpoint=checkpoint)

    def stop_for_nan(self, metrics: dict[str, float]) -> int:
        """All ranks see the same reduced loss, so all stop here together; no checkpoint is written."""
        step = self.state.step
        last = self.last_checkpoint_step
        self.sink.log({"step": step, "split": "error", "nonfinite_loss": True, "last_checkpoint_step": last})
        if self.rank == 0:
            # Result.metrics keeps only checkpointed reports, so the driver learns of the stop from this file.
            storage.write_json_atomic(storage.join(self.plan.run_dir, NONFINITE_FILE),
                                      {"step": step, "last_checkpoint_step": last, "metrics": metrics})
        self.session.report({"nonfinite_loss_step": step, "last_good_checkpoint_step": last,
                             "step": step, "epoch": self.state.epoch})
        return step

    def finish(self) -> None:
        if self.last_checkpoint_step != self.state.step:
            val = self.evaluate()
            self.report({f"val_{k}": v for k, v in val.items()}, checkpoint=True)
