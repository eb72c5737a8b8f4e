"""jobs.evaluate's scoring: a pool of Ray Data actors, each holding the model once, turns batches of
rows into the objective's summable statistics (the training loop's own objectives, so a checkpoint
scored on its validation split gets the numbers its run reported); the driver adds them up.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from cluster import hub, objectives
from cluster.checkpoints import local_copy, prepare_tokenizer
from cluster.data import tasks
from cluster.errors import JobError

if TYPE_CHECKING:  # the stage imports this module
    from cluster.stages.evaluate import EvaluateConfig

BATCHES_PER_BLOCK = 4


def model_tokenizer(path: str, spec: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer, made ready for a task as jobs.finetune makes it (a fine-tuned
    checkpoint's is ready already; a hub model's may lack a pad token or a pair template)."""
    if spec["kind"] in ("clm", "mlm"):
        from transformers import AutoTokenizer

        return hub.from_pretrained(AutoTokenizer.from_pretrained, path)
    return prepare_tokenizer(path, spec["kind"], pair=spec["pair"], token_types=spec["token_types"])


def batch_seed(seed: int, batch: dict[str, Any]) -> tuple[int, int, int, int]:
    """A batch's masking seed, shaped as the training loop's evaluation seed (seed, epoch -1, batch,
    rank) with the batch named by its first row, not by which actor scores it or when: the same
    split, batch size and seed always get the same masks."""
    first = np.asarray(batch["input_ids"][0], dtype=np.int64).tobytes()
    return seed, -1, int.from_bytes(hashlib.sha256(first).digest()[:6], "little"), 0


class Scorer:
    """One model replica in the actor pool: a batch of rows in, one row of summed statistics out
    (and, for completion, this replica's share of generated samples)."""

    def __init__(self, checkpoint: str, spec: dict[str, Any]):
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        from cluster.quantize import quantize
        from cluster.train.placement import autocast_dtype, inference_placement

        hf_logging.disable_progress_bar()
        torch.set_num_threads(spec["threads"])
        self.spec = spec
        # As Serve loads it: on this actor's GPU in bf16 (fp16 without bf16), else fp32 on the CPU.
        self.device, dtype = inference_placement(spec["use_gpu"])
        if spec["precision"] == "fp32":
            dtype = torch.float32
        self.amp = autocast_dtype(spec["precision"], self.device) if dtype == torch.float32 else None
        model_cls = getattr(transformers, spec["architecture"])
        self.model = hub.from_pretrained(model_cls.from_pretrained, local_copy(checkpoint), use_safetensors=True,
                                         trust_remote_code=False, dtype=dtype)
        self.model = quantize(self.model.to(self.device).eval(), spec.get("quantize"), self.device, "quantize")
        self.objective = objectives.build(spec, model_tokenizer(local_copy(checkpoint), spec))
        self.generated = 0
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        inputs = self.objective.collate(batch, batch_seed(self.spec["seed"], batch))
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        samples: list = []
        generate = getattr(self.objective, "generate", None)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                             enabled=self.amp is not None):
            _, stats = self.objective.forward(self.model, inputs)
            if generate and self.generated < self.spec["sample_cap"]:
                samples = generate(self.model, inputs, self.spec["sample_cap"] - self.generated)
                self.generated += len(samples)
        sums = {k: float(v) for k, v in stats.items()}
        return {"sums": np.array([json.dumps(sums)]), "samples": np.array([json.dumps(samples)]),
                "rows": np.array([len(batch["input_ids"])], dtype=np.int64), "replica": np.array([self.replica])}


def add_sums(rows: list[dict[str, Any]]) -> tuple[dict[str, float], list, int]:
    """The scored batches' statistics added up, their samples, and the rows scored."""
    sums: dict[str, float] = {}
    samples: list = []
    n = 0
    for r in rows:
        for k, v in json.loads(r["sums"]).items():
            sums[k] = sums.get(k, 0.0) + v
        samples += [tuple(p) for p in json.loads(r["samples"])]
        n += int(r["rows"])
    return sums, samples, n


def score(ds: ray.data.Dataset, checkpoint: str, spec: dict[str, Any], cfg: EvaluateConfig,
          tokenizer: Any) -> dict[str, Any]:
    """Every row of `ds` through the actor pool; the summed statistics as the objective's metrics."""
    if cfg.max_rows:
        ds = ds.limit(cfg.max_rows)
    # A few batches per block, so that a split in one or two shards still reaches every replica
    # (one block goes to one actor).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * BATCHES_PER_BLOCK)
    # Read and re-blocked before the actors start, in split order: the actors hold their CPUs from
    # the start, and on a cluster with no CPU beyond them the read tasks waited for the actors,
    # which waited for the reads (2 replicas on a 2-CPU `ray start` cluster hung for good).
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    workers = cfg.scaling.workers
    spec = {**spec, "seed": cfg.seed, "precision": cfg.precision, "use_gpu": cfg.scaling.use_gpu, "quantize": cfg.quantize,
            "threads": cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)),
            # each replica generates its share of the samples, as each training worker does
            "sample_cap": -(-cfg.eval.generate_examples // workers), "max_new_tokens": cfg.eval.max_new_tokens}
    # max_restarts=0. Ray Data hands every pool actor its transform (this Scorer and its kwargs) and
    # its context as object-store refs, and restarts dead actors by default; Ray Core (2.60) then
    # logs on the driver's console, as an error, that a restart could find those arguments gone
    # (ray-project/ray#53727), although the dataset holds them while it runs. Only a global log level
    # would hide it otherwise. Without restarts a replica lost mid-run (its node gone) fails the
    # evaluation as "scoring failed", with no summary written, and it is run again whole.
    scored = ds.map_batches(
        Scorer, fn_constructor_kwargs={"checkpoint": checkpoint, "spec": spec}, batch_size=cfg.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.scaling.cpus_per_worker,
        max_restarts=0, **({"num_gpus": 1} if cfg.scaling.use_gpu else {}),
    )
    # Rows in split order make the same batches whichever actor scores them: masked-LM masks and
    # NSP/SOP pairs are drawn per batch, so the metrics of a run do not depend on its scheduling.
    scored.context.execution_options.preserve_order = True
    t0 = time.time()
    try:
        rows = scored.take_all()
    except Exception as exc:
        raise JobError(f"scoring failed: {tasks.user_error(exc)}") from None
    seconds = time.time() - t0
    sums, samples, n = add_sums(rows)
    if not n:
        raise JobError(f"the {cfg.split} split has no rows to score")
    objective = objectives.build(spec, tokenizer)
    metrics = objective.summarize(sums)
    if hasattr(objective, "score_samples"):
        metrics |= objective.score_samples(samples)
    return {"rows": n, "replicas_used": len({r["replica"] for r in rows}), "scoring_seconds": round(seconds, 2),
            "metrics": metrics, "samples": [{"generated": h, "reference": r} for h, r in samples[:8]]}
