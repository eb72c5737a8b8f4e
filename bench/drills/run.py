"""Run the reliability drills and write RELIABILITY.md (`make drills`).

    python -m bench.drills.run                    # every group, ~25 minutes on 2 cores
    python -m bench.drills.run --groups serve,security --requests 1000

Groups run one after another, each in its own process: `security`, `hostile` and `serve` on an
embedded local Ray; `faults` on a local multi-node cluster (head + 2 worker nodes) it starts and
stops itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.drills.common import REPO, Finding, as_dict, write_report

GROUPS = ("security", "hostile", "serve", "faults")
FUZZ_MIN_CASES = 2000  # schemathesis requests the hostile drill sends at least


def _serve_models(workdir: str) -> str:
    """Tiny models of every task published to a registry of the drill's own; returns its root."""
    from serve import tiny

    root = os.path.join(workdir, "registry")
    tiny.publish_all(os.path.join(workdir, "ckpts"), root=root)
    return root


def group_security(workdir: str, args: argparse.Namespace) -> list[Finding]:
    from ray import serve

    from bench.drills import security
    from bench.drills.serve_load import deploy
    from cluster import runtime
    from serve import tiny

    findings = security.dashboard_loopback()
    runtime.connect()
    findings += security.planted_pickle(tiny.save_bert(os.path.join(workdir, "cls"), "classification"), workdir)
    registry = _serve_models(workdir)
    os.environ["RAYLM_API_KEY"] = "drill-key"  # build_app hands it to the ingress replica
    try:
        url = deploy(registry, "secure", {"model": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.1}})
    finally:
        os.environ.pop("RAYLM_API_KEY")
    findings += security.api_key(url, "drill-key")
    serve.shutdown()
    return findings


def group_hostile(workdir: str, args: argparse.Namespace) -> list[Finding]:
    from ray import serve

    from bench.drills import hostile
    from bench.drills.serve_load import deploy
    from cluster import runtime
    from serve import tiny

    runtime.connect()
    findings = hostile.corpus_files(workdir)
    findings += hostile.failed_reprepare(workdir)
    registry = _serve_models(workdir)
    url = deploy(registry, "fuzz", {"model": {"num_cpus": 0.25, "max_batch_size": 4}, "ingress": {"num_cpus": 0.1},
                                    "max_tokens": 32, "max_body_bytes": 65536})
    findings += hostile.fuzz_api(url, args.fuzz_examples, min_cases=FUZZ_MIN_CASES)
    serve.delete("fuzz")
    findings += hostile.corrupted_weights(registry, tiny.save_bert(os.path.join(workdir, "cls"), "classification"))
    serve.shutdown()
    findings += hostile.concurrent_publish(workdir, tiny.save_gpt(os.path.join(workdir, "race-ckpt")))
    return findings


def group_serve(workdir: str, args: argparse.Namespace) -> list[Finding]:
    from ray import serve

    from bench.drills import serve_load
    from cluster import runtime

    runtime.connect()
    findings = serve_load.run(_serve_models(workdir), total=args.requests, concurrency=args.concurrency)
    serve.shutdown()
    return findings


def _guarded(drill) -> list[Finding]:
    """A drill whose own code raises is a failed figure, and the group's other drills still run."""
    try:
        return drill()
    except Exception as exc:  # the drill's failure is what gets reported
        import traceback

        traceback.print_exc()
        return [Finding("drill crashed", f"{type(exc).__name__}: {exc}"[:300], "runs to the end", False)]


def group_faults(workdir: str, args: argparse.Namespace) -> list[Finding]:
    from bench.drills import faults
    from bench.drills.local_cluster import DrillCluster

    c = DrillCluster.up(workers=2, cpus_per_node=2)
    try:
        faults.prepare_corpus(c)
        seeds = list(range(1, args.seeds + 1))
        base = os.path.join(c.storage, "pretrain", f"base-{seeds[0]}")  # a run folder: its best checkpoint
        findings = []
        for drill in (lambda: faults.worker_kills(c, seeds), lambda: faults.node_kill(c, seeds[0]),
                      lambda: faults.job_stop_and_resubmit(c), lambda: faults.kill_during_checkpoint(c),
                      lambda: faults.sweep_trial_kill(c, base)):
            findings += _guarded(drill)
    finally:
        c.down()
    return findings


def run_group(name: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    """One group in a fresh process (each needs its own Ray); returns its findings and seconds."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    cmd = [sys.executable, "-m", "bench.drills.run", "--inner", name, "--inner-out", out,
           "--requests", str(args.requests), "--concurrency", str(args.concurrency), "--seeds", str(args.seeds),
           "--fuzz-examples", str(args.fuzz_examples)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = REPO
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    seconds = time.time() - t0
    if proc.returncode or not os.path.getsize(out):
        return [as_dict([Finding(name, f"the drill group crashed (exit {proc.returncode})", "runs", False)])[0]], seconds
    return json.load(open(out)), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.drills.run", description=__doc__.splitlines()[0])
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    p.add_argument("--requests", type=int, default=5000, help="requests per load run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3, help="runs with a killed training worker")
    p.add_argument("--fuzz-examples", type=int, default=400, help="schemathesis examples per operation (400: "
                   f"~2,500 requests, at least {FUZZ_MIN_CASES} are required)")
    p.add_argument("--output", default=os.path.join(REPO, "RELIABILITY.md"))
    p.add_argument("--inner", help=argparse.SUPPRESS)
    p.add_argument("--inner-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        workdir = tempfile.mkdtemp(prefix=f"raylm-drill-{args.inner}-")
        os.environ["RAYLM_STORAGE"] = os.path.join(workdir, "storage")
        os.environ.setdefault("RAYLM_DASHBOARD", "0")
        findings = globals()[f"group_{args.inner}"](workdir, args)
        with open(args.inner_out, "w") as f:
            json.dump(as_dict(findings), f)
        return 0
    findings, seconds = [], {}
    for name in [g.strip() for g in args.groups.split(",") if g.strip()]:
        if name not in GROUPS:
            p.error(f"unknown group '{name}' (known: {', '.join(GROUPS)})")
        rows, seconds[name] = run_group(name, args)
        findings += [Finding(**r) for r in rows]
        print(f"== {name}: {sum(r['passed'] for r in rows)} of {len(rows)} figures met ({seconds[name]:.0f} s)",
              flush=True)
        for r in rows:
            print(f"   {'pass' if r['passed'] else 'FAIL'}  {r['drill']}: {r['figure']}", flush=True)
    command = "python -m bench.drills.run" + ("" if args.groups == ",".join(GROUPS) else f" --groups {args.groups}")
    print(write_report(findings, args.output, command, seconds))
    return 0 if all(f.passed for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
