"""Shared fixtures. Integration tests share one local Ray per session (starting Ray costs ~10 s
here) and one small synthetic corpus per layout; unit tests never start Ray."""

from __future__ import annotations

import gc
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Python's cyclic GC runs a full collection every ~70k net allocations while the heap grows. Here
# the heap is ~500k objects (torch, transformers, Ray, pandas), so the unit tests spent ~4-5 s of
# ~35 s in full collections; at these thresholds ~0.1 s, with the same peak memory. Integration
# sessions (Ray object references freed by refcounts and cycles) keep Python's defaults.
_GC_DEFAULT = gc.get_threshold()
_GC_UNIT = (10_000, 20, 20)


def pytest_configure(config):
    gc.set_threshold(*_GC_UNIT)  # while collecting: imports only


def pytest_collection_finish(session):
    integration = os.path.join(REPO, "tests", "integration")
    if any(str(item.path).startswith(integration + os.sep) for item in session.items):
        gc.set_threshold(*_GC_DEFAULT)


def pytest_unconfigure(config):
    gc.set_threshold(*_GC_DEFAULT)


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("raylm-storage"))
    os.environ["RAYLM_STORAGE"] = root
    return root


@pytest.fixture(scope="session")
def ray_session(storage_root):
    import ray

    from cluster import runtime

    os.environ.setdefault("RAYLM_DASHBOARD", "0")
    os.environ.pop("RAY_ADDRESS", None)
    runtime.connect()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _prepare(name: str, config: str, sets: list[str]):
    from cluster.config import load_config
    from cluster.data.corpus import Corpus
    from cluster.stages.prepare import PrepareConfig
    from jobs.prepare import run

    cfg = load_config(PrepareConfig, os.path.join(REPO, "configs", config), [f"name={name}", *sets])
    run(cfg)
    return Corpus.open(name)


@pytest.fixture(scope="session")
def gpt_corpus(ray_session):
    """The demo's corpus recipe (byte-level BPE, 128-token blocks) on fewer documents, in small shards."""
    return _prepare("t-gpt", "prepare-synthetic.yaml",
                    ["sources.0.num_docs=6000", "output.shard_mb=0.2", "split.validation_fraction=0.1"])


def subprocess_env(ray_address: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


PYTHON = sys.executable

# Bad input to each job, the last line of what it reports and the run folder it must not create:
# tests/unit/test_entry.py calls each job's main in-process, tests/integration/test_entrypoints.py
# runs `python -m <job>`.
BAD_JOB_INPUT = [
    ("jobs.pretrain", ["--config", "configs/gpt-tiny.yaml", "--set", "corpus=no-such-corpus"],
     "error: corpus 'no-such-corpus' not found", "pretrain"),
    ("jobs.prepare", ["/no/such/notes.txt", "--name", "notes"],
     "error: source 'files': '/no/such/notes.txt' does not exist", "prepare"),
    ("jobs.finetune", ["--config", "configs/finetune-topic-tiny.yaml", "--set", "model.checkpoint=./no-such-ckpt"],
     "error: model.checkpoint './no-such-ckpt' does not exist", "finetune"),
    ("tune.sweep", ["--config", "configs/tune-topic-tiny.yaml", "--set", "metric=val_f1"],
     "  - metric 'val_f1' is never reported by a classification trial", "tune"),
]


@pytest.fixture(scope="session")
def bert_corpus(ray_session):
    """The BERT-family recipe: WordPiece tokenizer, sentence-aware segments."""
    return _prepare("t-bert", "prepare-synthetic-bert.yaml",
                    ["sources.0.num_docs=5000", "output.shard_mb=0.2", "split.validation_fraction=0.1"])


def _pretrain(name: str, config: str, corpus: str, sets: list[str]) -> str:
    """A short pretraining run on the shared Ray; returns its run name (fine-tuning resolves it)."""
    from cluster.config import load_config
    from cluster.stages.pretrain import PretrainConfig
    from jobs.pretrain import run

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", config),
                      [f"name={name}", f"corpus={corpus}", "scaling.threads_per_worker=2", *sets])
    run(cfg)
    return name


@pytest.fixture(scope="session")
def gpt_base(gpt_corpus):
    """A tiny GPT pretrained for 80 steps: the base model of the fine-tuning and sweep tests."""
    return _pretrain("t-base-gpt", "gpt-tiny.yaml", "t-gpt",
                     ["train.max_steps=80", "train.eval_every=40", "train.checkpoint_every=80", "train.eval_batches=4"])


@pytest.fixture(scope="session")
def bert_base(bert_corpus):
    """A tiny BERT pretrained for 60 steps (MLM + NSP)."""
    return _pretrain("t-base-bert", "bert-tiny.yaml", "t-bert",
                     ["train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60", "train.eval_batches=4"])


S3_BUCKET = "raylm-test"


@pytest.fixture(scope="session")
def s3_env():
    """A local S3 API (moto's server) and the AWS settings that point pyarrow, and so Ray and raylm, at
    it, as AWS_ENDPOINT_URL points them at any S3-compatible store: `RAYLM_STORAGE=s3://raylm-test/...`
    with no cloud. Set in this process while the session lasts; returned for subprocesses."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cluster.runtime import free_ports

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "raylm-test", "AWS_SECRET_ACCESS_KEY": "raylm-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """serve.tiny's byte-level BPE tokenizer (400 tokens, trained here in a second; no Ray)."""
    from transformers import PreTrainedTokenizerFast

    from serve import tiny

    return PreTrainedTokenizerFast.from_pretrained(tiny.save_gpt(str(tmp_path_factory.mktemp("tok")), max_len=32))
