"""jobs.prepare: raw text -> cleaned, de-duplicated, tokenized, packed Parquet shards (Ray Data).

    python -m jobs.prepare --config configs/prepare-synthetic.yaml [--set name=mycorpus]
    raylm prepare notes/*.txt books.jsonl --name mycorpus
    raylm prepare 's3://bucket/raw/**/*.jsonl.gz' --name web
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.prepare import PrepareConfig, prepare


def run(cfg: PrepareConfig) -> str:
    summary = prepare(cfg)
    return RunDir("prepare", cfg.name).write_summary(summary)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="files, folders or globs to prepare, local or object-store URIs (s3://...) "
                   "(instead of a config's sources)")
    p.add_argument("--name", help="corpus name (default: the config's, or 'corpus')")
    p.add_argument("--text-column", default=None, help="JSON key / parquet column holding the text")


def _from_args(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    if args.inputs:
        source = {"kind": "files", "paths": args.inputs}
        if args.text_column:
            source["text_column"] = args.text_column
        out["sources"] = json.dumps([source])
    if args.name:
        out["name"] = args.name
    return out


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.prepare", PrepareConfig, argv, run, __doc__, _extra, _from_args)


if __name__ == "__main__":
    sys.exit(main())
