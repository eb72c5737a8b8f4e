"""jobs.demo: the whole pipeline on the built-in synthetic corpus, on an embedded local Ray.

prepare (Ray Data) -> pretrain a tiny GPT (Ray Train) -> sample continuations from the final
checkpoint with plain transformers. `make demo` runs this; each later stage adds itself here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cluster import runtime
from cluster.config import load_config
from cluster.corpus import PrepareConfig
from cluster.entry import setup_logging, user_errors
from cluster.pretrain import PretrainConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PROMPTS = ["The", "In the match", "The market"]


def sample(checkpoint: str, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[str]:
    """Continuations from a checkpoint, loaded by transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the gpt-tiny config's)")
    p.add_argument("--docs", type=int, default=None, help="synthetic documents (default: the config's)")
    args = p.parse_args(argv)
    setup_logging()
    from jobs import prepare as prepare_job
    from jobs import pretrain as pretrain_job

    try:
        runtime.connect()
        prep_sets = ["name=demo"] + ([f"sources.0.num_docs={args.docs}"] if args.docs else [])
        prep = load_config(PrepareConfig, os.path.join(CONFIGS, "prepare-synthetic.yaml"), prep_sets)
        print("== 1. prepare: synthetic corpus -> shards (Ray Data)", flush=True)
        prep_summary = json.load(open(prepare_job.run(prep)))
        print(f"   corpus: {prep_summary['corpus']}  entropy floor: "
              f"{prep_summary['entropy_floor_bpb']['validation']:.3f} bits/byte", flush=True)

        train_sets = ["name=demo-gpt", "corpus=demo"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
        train = load_config(PretrainConfig, os.path.join(CONFIGS, "gpt-tiny.yaml"), train_sets)
        print("== 2. pretrain: tiny GPT (Ray Train)", flush=True)
        summary_path = pretrain_job.run(train)
        summary = json.load(open(summary_path))
        final = summary["final"]
        print(f"   final checkpoint: {final['checkpoint']}\n   validation: "
              f"{final['metrics'].get('val_bits_per_byte', float('nan')):.3f} bits/byte "
              f"(floor {summary['entropy_floor_bpb']:.3f})", flush=True)

        print("== 3. samples from the final checkpoint (plain transformers)", flush=True)
        for text in sample(final["checkpoint"], PROMPTS):
            print(f"   > {text}", flush=True)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
