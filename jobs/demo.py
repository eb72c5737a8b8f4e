"""jobs.demo: the whole pipeline on the built-in synthetic corpus, on an embedded local Ray.

prepare (Ray Data) -> pretrain a tiny GPT (Ray Train) -> sample from it with plain transformers ->
sweep fine-tuning hyperparameters for topic classification (Ray Tune, ASHA) and publish the best
classifier and the pretrained GPT to the registry -> score the classifier on held-out rows
(jobs.evaluate, Ray Data) -> distil the classifier into a 1-block student (jobs.distill) and
publish it -> serve them (Ray Serve) and query them over HTTP. `make demo` runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.request

from cluster import registry, runtime, storage
from cluster.config import load_config
from cluster.entry import setup_logging, user_errors
from cluster.stages.prepare import PrepareConfig
from cluster.stages.pretrain import PretrainConfig
from tune.config import SweepConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PROMPTS = ["The", "In the match", "The market"]
GPT_NAME, CLASSIFIER_NAME, STUDENT_NAME = "demo-gpt", "demo-topic", "demo-topic-student"  # registry names


def sample(checkpoint: str, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[str]:
    """Continuations from a checkpoint, loaded by transformers alone (from a local copy of a URI)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.checkpoints import local_copy

    checkpoint = local_copy(checkpoint)

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=20,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def publish_gpt(summary: dict) -> str:
    """The pretrained GPT as a generation model; the demo's own entry, so a re-run replaces it."""
    metrics = summary["final"]["metrics"]
    metric = {"name": "val_bits_per_byte", "value": metrics["val_bits_per_byte"], "mode": "min"}
    return registry.publish(summary["final"]["checkpoint"], GPT_NAME, "generation", metric=metric, force=True)


def _post(url: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def query(base: str) -> None:
    """A completion, a streamed completion and a classification, over plain HTTP."""
    completion = {"model": GPT_NAME, "prompt": "The market", "max_tokens": 20, "temperature": 0}
    with urllib.request.urlopen(_post(f"{base}/v1/completions", completion), timeout=120) as r:
        print(f"   completion > The market{json.load(r)['choices'][0]['text']}", flush=True)
    print("   streamed   > In the match", end="", flush=True)
    stream = {**completion, "prompt": "In the match", "stream": True}
    with urllib.request.urlopen(_post(f"{base}/v1/completions", stream), timeout=120) as r:
        for line in r:
            data = line.decode().strip().removeprefix("data: ")
            if data and data != "[DONE]":
                print(json.loads(data)["choices"][0]["text"], end="", flush=True)
    print(flush=True)
    texts = ["Shares of Vela Bank rose 12 percent in Calder.", "Ada Okafor scored 3 goals as Kite Labs won in Tarn."]
    with urllib.request.urlopen(_post(f"{base}/v1/classify", {"model": CLASSIFIER_NAME, "inputs": texts}),
                                timeout=120) as r:
        for text, result in zip(texts, json.load(r)["results"], strict=True):
            print(f"   classify   > {text!r}: {result['label']} ({result['score']:.2f})", flush=True)
    storage = f"RAYLM_STORAGE={os.environ['RAYLM_STORAGE']} " if os.environ.get("RAYLM_STORAGE") else ""
    print(f"   try it by hand: {storage}raylm serve run --port 8000   # then, from another shell:\n"
          f"   curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' "
          f"-d '{json.dumps({'model': GPT_NAME, 'prompt': 'The market', 'max_tokens': 20})}'", flush=True)


def serve_and_query(port: int) -> None:
    from ray import serve

    from serve.app import build_app

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"models": [GPT_NAME, CLASSIFIER_NAME], "model": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.1}}
        serve.run(build_app(args), name="raylm", route_prefix="/")
        query(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


def prepare_stage(docs: int | None) -> None:
    from jobs import prepare as prepare_job

    prep_sets = ["name=demo"] + ([f"sources.0.num_docs={docs}"] if docs else [])
    prep = load_config(PrepareConfig, os.path.join(CONFIGS, "prepare-synthetic.yaml"), prep_sets)
    print("== 1. prepare: synthetic corpus -> shards (Ray Data)", flush=True)
    prep_summary = storage.read_json(prepare_job.run(prep))
    print(f"   corpus: {prep_summary['corpus']}  entropy floor: "
          f"{prep_summary['entropy_floor_bpb']['validation']:.3f} bits/byte", flush=True)


def pretrain_stage(steps: int | None) -> dict:
    """Pretrain, then sample the final checkpoint with plain transformers; the run's summary."""
    from jobs import pretrain as pretrain_job

    train_sets = ["name=demo-gpt", "corpus=demo"] + ([f"train.max_steps={steps}"] if steps else [])
    train = load_config(PretrainConfig, os.path.join(CONFIGS, "gpt-tiny.yaml"), train_sets)
    print("== 2. pretrain: tiny GPT (Ray Train)", flush=True)
    summary = storage.read_json(pretrain_job.run(train))
    final = summary["final"]
    print(f"   final checkpoint: {final['checkpoint']}\n   validation: "
          f"{final['metrics'].get('val_bits_per_byte', float('nan')):.3f} bits/byte "
          f"(floor {summary['entropy_floor_bpb']:.3f})", flush=True)
    print("== 3. samples from the final checkpoint (plain transformers)", flush=True)
    for text in sample(final["checkpoint"], PROMPTS):
        print(f"   > {text}", flush=True)
    return summary


def sweep_stage(pretrained: dict) -> str:
    """The sweep, its best classifier published, the pretrained GPT published; the sweep's summary path."""
    from tune import sweep as sweep_job

    print("== 4. sweep: fine-tune it for topic classification (Ray Tune, ASHA), publish the best", flush=True)
    sweep_cfg = load_config(SweepConfig, os.path.join(CONFIGS, "tune-topic-tiny.yaml"),
                            ["name=demo-topic", "finetune.model.checkpoint=demo-gpt", f"publish.name={CLASSIFIER_NAME}"])
    sweep_path = sweep_job.run(sweep_cfg)
    sweep = storage.read_json(sweep_path)
    best = sweep["best"]
    print(f"   best trial {best['trial_id']}: {sweep['metric']} {best[sweep['metric']]:.3f} "
          f"(majority-class baseline {sweep['baseline']['accuracy']:.3f}) with {best['config']}; "
          f"{sweep['stopped_early']} of {sweep['trials']} trials stopped early", flush=True)
    reg = sweep["registry"]
    print(f"   registry: {reg['path'] if reg['published'] else 'not published: ' + reg['reason']}")
    print(f"   registry: {publish_gpt(pretrained)} (generation)", flush=True)
    return sweep_path


def evaluate_stage() -> None:
    from cluster.stages.evaluate import EvaluateConfig
    from jobs import evaluate as evaluate_job

    print("== 5. evaluate: the published classifier on 400 topic rows it never saw (Ray Data)", flush=True)
    held_out = load_config(EvaluateConfig, os.path.join(CONFIGS, "evaluate-topic-tiny.yaml"),
                           ["name=demo-topic", f"model={CLASSIFIER_NAME}"])
    scored = storage.read_json(evaluate_job.run(held_out))["metrics"]
    print(f"   accuracy {scored['accuracy']:.3f}, macro-F1 {scored['macro_f1']:.3f} on held-out rows", flush=True)


def p50_latency_ms(engine, text: str, calls: int = 40) -> float:
    """Median in-process latency of one classification (after two warm-up calls)."""
    import statistics
    import time

    times = []
    for i in range(calls + 2):
        t0 = time.perf_counter()
        engine.classify([text], [None])
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def distill_stage(steps: int | None) -> None:
    """The published classifier distilled into a 1-block student, published; teacher vs student."""
    from cluster.stages.distill import DistillConfig
    from jobs import distill as distill_job
    from serve import engines

    print("== 6. distil: the classifier into a 1-block student (Ray Train), publish it", flush=True)
    sets = ["name=demo-topic-student", f"teacher={CLASSIFIER_NAME}", "compare_baseline=false"]
    cfg = load_config(DistillConfig, os.path.join(CONFIGS, "distill-topic-tiny.yaml"),
                      sets + ([f"train.max_steps={steps}"] if steps else []))
    # the demo's own student: a re-run distils the classifier it has now, from the start
    storage.delete(storage.join(storage.storage_root(), "distill", cfg.name))
    summary = storage.read_json(distill_job.run(cfg))
    best = summary["best"] or summary["final"]
    metric = {"name": "val_accuracy", "value": best["metrics"]["val_accuracy"], "mode": "max"}
    registry.publish(best["checkpoint"], STUDENT_NAME, "classification", metric=metric, force=True)
    teacher, student = summary["teacher"], summary["student"]
    text = "Shares of Vela Bank rose 12 percent in Calder."
    rows = [("teacher", teacher, engines.load(registry.find(CLASSIFIER_NAME))),
            ("student", student, engines.load(registry.find(STUDENT_NAME))),
            ("student int8", student, engines.load(registry.find(STUDENT_NAME), "int8"))]
    accuracy = {"teacher": teacher["metrics"]["val_accuracy"], "student": best["metrics"]["val_accuracy"]}
    for label, about, engine in rows:
        acc = accuracy.get(label)
        print(f"   {label:<13} {about['layers']} block(s), {about['params'] / 1e6:.2f}M parameters, "
              f"validation accuracy {'(not scored)' if acc is None else f'{acc:.3f}'}, "
              f"p50 {p50_latency_ms(engine, text):.1f} ms per text in-process", flush=True)
    print(f"   registry: {registry.find(STUDENT_NAME)['path']} (classification)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the gpt-tiny config's)")
    p.add_argument("--docs", type=int, default=None, help="synthetic documents (default: the config's)")
    p.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default: the config's)")
    p.add_argument("--port", type=int, default=0, help="HTTP port for the serve stage (default: a free one)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        runtime.connect()
        prepare_stage(args.docs)
        sweep_path = sweep_stage(pretrain_stage(args.steps))
        evaluate_stage()
        distill_stage(args.distill_steps)
        print("== 7. serve: the registry on Ray Serve, queried over HTTP", flush=True)
        serve_and_query(args.port)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(sweep_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
