"""Checkpoints and publisher processes the registry tests share (unit, object-store, integration)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from tests.conftest import REPO, subprocess_env


def reweighted(src: str, dst: str, seed: int) -> str:
    """A copy of checkpoint `src` with every weight moved by seeded noise: the same model and
    tokenizer with other weights, so two versions of one name differ in their bytes and answers."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = os.path.join(dst, "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (t + 0.5 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
               for k, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


# A publish in its own process: argv = checkpoint, name, root, sweep id, and a file to wait for (so two
# processes start their publishes together); `<go>.<sweep id>` says it is ready. Prints the version's path.
PUBLISH = """
import os, sys, time
from cluster import registry
checkpoint, name, root, sweep_id, go = sys.argv[1:6]
open(go + "." + sweep_id, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
print(registry.publish(checkpoint, name, None, sweep_id=sweep_id, force=True, root=root), flush=True)
"""

# A publish that stops between writing its version and moving the pointer: it writes its pid to the
# file argv[5] there and waits to be killed. argv = checkpoint, name, root, sweep id, marker.
STALLED_PUBLISH = """
import os, sys, time
from cluster import registry, registry_versions
checkpoint, name, root, sweep_id, marker = sys.argv[1:6]
def stall(entry_dir, entry):
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
registry_versions.move_pointer = stall
registry.publish(checkpoint, name, None, sweep_id=sweep_id, force=True, root=root)
"""


def start_together(script: str, go: str, runs: list[tuple[str, ...]], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Run `script` once per argument tuple (checkpoint, name, root, sweep id), all released by the
    file `go` once every one has started; returns (exit code, stdout, stderr) of each."""
    procs = [start(script, *run, go) for run in runs]
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(f"{go}.{run[3]}") for run in runs) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    open(go, "w").close()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def start(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env={**subprocess_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
