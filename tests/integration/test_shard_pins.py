"""Each shipped prepare recipe, on a few documents, writes the very shards it wrote when these
digests were taken: reading, cleaning, exact de-duplication, the split, the tokenizer's seeded
sample across sources, tokenizing and packing are all deterministic, whatever the cluster's size
(the shared Ray's CPUs here, one CPU below). A change that moves any byte of a corpus fails here;
if the change means to (a new tokenizer sample, a packing fix), re-take the digests and say why
in its commit. With the same tokenizer the shards were byte-identical before and after
preparation's counts moved off the driver (72fb29f and after); the WordPiece digests were taken
after its training was made deterministic (2026-12-06)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, _prepare, subprocess_env

# recipe -> the --set overrides that keep it small -> sha256 of each shard, in the manifest's order
PINS = {
    "prepare-synthetic.yaml": (["sources.0.num_docs=1500", "output.shard_mb=0.1"], {
        "shards/train/train-00000-0.parquet": "78d8e1d97266ccdc5c1d634cb141d18b6287aaada145163a75c5c71df41570ca",
        "shards/train/train-00001-0.parquet": "ec29ef5795329bc1651eaa2f1d0bafd569049151476264c4818e7b40dbe29e26",
        "shards/train/train-00002-0.parquet": "ee860bf9de7d23dfc971c05fe552e69ab2620bd9c60c04747def2a4c5791671e",
        "shards/train/train-00003-0.parquet": "4189b512640713c54f1d74510582bbdb6a04a22781f30ead035c0414ab250921",
        "shards/validation/validation-00000-0.parquet": "1bceaa5a810af638cd6bea69b68b961f9784e4a0c24a4e4156fb5048646a9308",
    }),
    "prepare-synthetic-bert.yaml": (["sources.0.num_docs=1500", "output.shard_mb=0.1"], {
        "shards/train/train-00000-0.parquet": "7d00ed07471c4448917b60be4413dff019c817b4602a5ade9df52a465261e00a",
        "shards/train/train-00001-0.parquet": "63a08eb484794335b4e99cd8e14e009577f7c6c2a8bc9e4bce6f1501f0368d76",
        "shards/train/train-00002-0.parquet": "c0bfb850967c92e28bf06059322b9109818e2f2658fb3d278d3415099a825739",
        "shards/train/train-00003-0.parquet": "393e1c59996b540c15bd4014813bad8936caddd52674bcad34f60cb66c947a00",
        "shards/train/train-00004-0.parquet": "b33781882ac94f097bcb3da35081a85d5fbaabc2253a70756b22ec5658998ad0",
        "shards/train/train-00005-0.parquet": "17f5a515b4f3a8b86019253d6cd8afee030bc8866722bdb8e78c5261fddbb1a1",
        "shards/train/train-00006-0.parquet": "8916888a01276c5eeb851bf48d664af03fe7ae35fa414304a71c06714ef9143f",
        "shards/train/train-00007-0.parquet": "bf5ad7a18e20fd534c9343b6c80f95beef386e9c28f8ebc7abd21d2b1860bd58",
        "shards/train/train-00008-0.parquet": "dddf2592e3ffb686f31f22b0d57090e267c28500f69245215fc692d874d3dece",
        "shards/train/train-00009-0.parquet": "8661a9f4af1a403e8cf39ae554728f860e3c1de9c484dc25529b9a06c0ae18ff",
        "shards/train/train-00010-0.parquet": "c13395f2adeb7c6c716926cc3fcbdec6456c119ebe30c1f7d41703148d11512c",
        "shards/validation/validation-00000-0.parquet": "f75fdf93e7b3132ab56bcb62ca62868b34dea9a82abcd819e6b61cf610e8d739",
    }),
    "prepare-zh-bert.yaml": (["sources.0.num_docs=800", "sources.1.num_docs=800", "output.shard_mb=0.1"], {
        "shards/train/train-00000-0.parquet": "630c2fb94b10dbd0d00a3c2af1b0452aad76a7c726753b11c7f505c3ff6a5ba7",
        "shards/train/train-00001-0.parquet": "264750ba945ba243d6927067fc22426125e8fb5a318b7629e6ab3c0dd53fbdf0",
        "shards/train/train-00002-0.parquet": "842aec1c8ab7578c8a88cfaace9a291714ad3c0e8e1caf58163e6fa73010ba3e",
        "shards/train/train-00003-0.parquet": "841208c719fb2d08a0fe2163ccc213eebcd0f4505184bd1c284a5a095627ab79",
        "shards/train/train-00004-0.parquet": "0ed6e6210c23a4444874cf6bddcda7d3421bb971f9530fa88639f507ac170558",
        "shards/train/train-00005-0.parquet": "25804da0c6435f44b8ce1f191f088daaf222f305d16fd7771b6b5d273648fe7c",
        "shards/train/train-00006-0.parquet": "84aa1a487d0afc112cc24f4228c2b50965b6e04574f5759dde4e70b16f0ace91",
        "shards/train/train-00007-0.parquet": "e68fdfcb3936c14c9d2429578af9dbd24a231e78e4d45e8d0dc71ab4d12fe931",
        "shards/train/train-00008-0.parquet": "9984bda1812de7fbe13b10f5d253b11a3ba570c4506010ca161eda056c9ec032",
        "shards/train/train-00009-0.parquet": "6cddeb13b3e3ac25391da18d5b6f69d6a0eb40e2a4142c7f9bdb5b945b928748",
        "shards/train/train-00010-0.parquet": "95006918536f206b23f49d3b39526295278bf0edc82fc39aa54ca8af64ce3afd",
        "shards/train/train-00011-0.parquet": "25178276c5377e616b4bdca50032c3fc242951f06e09a96e27bd3bf162806a56",
        "shards/train/train-00012-0.parquet": "ed02c961b3763ec686caf742899800840153bc4a35d5cd193e08d19970f129d5",
        "shards/validation/validation-00000-0.parquet": "43e8d3946ed2176032550456621ef95ea51fb19f1ae70e58c04e1d09bf866e0e",
    }),
}


@pytest.mark.parametrize("recipe", sorted(PINS))
def test_a_shipped_recipe_writes_the_pinned_shards(ray_session, recipe):
    sets, pinned = PINS[recipe]
    corpus = _prepare(f"t-pin-{recipe.removesuffix('.yaml')}", recipe, sets)
    got = {s["file"]: s["sha256"] for s in corpus.manifest["shards"]}
    assert got == pinned, f"{recipe}: shards differ from the pinned digests; now {got}"


def test_a_one_cpu_ray_writes_the_same_shards(tmp_path):
    # Regression: the tokenizer's training task held the only CPU while the sample it reads still
    # needed one to be drawn, and `jobs.prepare` on a 1-CPU Ray waited forever.
    recipe = "prepare-synthetic-bert.yaml"
    sets, pinned = PINS[recipe]
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    env.update(RAYLM_STORAGE=str(tmp_path), RAYLM_NUM_CPUS="1", RAYLM_DASHBOARD="0")
    args = [PYTHON, "-m", "jobs.prepare", "--config", os.path.join("configs", recipe), "--set", "name=one-cpu",
            *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = json.load(open(tmp_path / "prepare" / "one-cpu" / "manifest.json"))
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == pinned
