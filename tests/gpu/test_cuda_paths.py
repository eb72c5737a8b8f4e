"""The GPU paths in short form, on one CUDA GPU and no Ray (`pytest -m gpu tests/gpu`; deselected by
default): the loop's placement, bf16 and resume on the device, FSDP2 with a one-rank NCCL group, and
Serve's engines loading onto the GPU. `make gpu-check` runs the same paths through Ray at full size."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.unit.test_loop import BASE, StubSession, make_loop, rows, train_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


class GpuSession(StubSession):
    """The stub session on the GPU: placement is a real device move, or FSDP2 sharding."""

    device = CUDA

    def prepare_model(self, model, strategy, param_dtype):
        from cluster.train.placement import shard

        self.placed = shard(model, CUDA, param_dtype) if strategy == "fsdp" else model.to(CUDA)
        return self.placed


@pytest.fixture()
def gpu_session(monkeypatch):
    monkeypatch.setattr("tests.unit.test_loop.StubSession", GpuSession)


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bf16_on_the_gpu_trains_and_resumes_with_its_state_on_the_gpu(tmp_path, tiny_tokenizer, gpu_session):
    data = rows(160, len(tiny_tokenizer))
    loop, session = make_loop(tmp_path / "a", tiny_tokenizer, data, [*BASE, "train.max_steps=6"])
    assert loop.amp == torch.bfloat16 and next(session.placed.parameters()).device.type == "cuda"
    loop.run()
    resumed, session2 = make_loop(tmp_path / "b", tiny_tokenizer, data, [*BASE, "train.max_steps=6"],
                                  resume_from=os.path.join(str(tmp_path / "a" / "kept"), "checkpoint_0000006"))
    resumed.resume()
    states = [resumed.optimizer.state[p] for p in session2.placed.parameters()]
    assert all(s["exp_avg"].device.type == "cuda" for s in states)
    resumed.optimizer_step()  # a step with restored state on the device runs


def test_fsdp2_on_one_gpu_trains_in_bf16_and_saves_a_whole_checkpoint(tmp_path, tiny_tokenizer, gpu_session,
                                                                       one_rank_group):
    from cluster.train.placement import is_fsdp

    loop, session = make_loop(tmp_path, tiny_tokenizer, rows(20 * 16, len(tiny_tokenizer)),
                              [*BASE, "scaling.strategy=fsdp"])
    assert is_fsdp(loop.model) and loop.amp is None  # the FSDP policy computes in bf16 instead
    loop.run()
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0] * 0.9
    ckpt = os.path.join(str(tmp_path / "kept"), "checkpoint_0000020")
    assert os.path.exists(os.path.join(ckpt, "model.safetensors"))
    assert os.listdir(os.path.join(ckpt, "train_state", "optimizer"))


def test_serve_engines_load_onto_the_gpu_in_bf16(tmp_path):
    from cluster import registry
    from serve import engines, tiny

    tiny.publish_all(str(tmp_path / "ckpts"), root=str(tmp_path))
    gen = engines.load({**registry.load_entry("gpt-tiny", str(tmp_path))})
    assert gen.placement() == {"device": "cuda", "dtype": "bfloat16"}
    params = {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": None, "seed": 3}
    ids = gen.encode("the cat", 8)
    assert len(gen.generate([ids], params)[0]) == 2
    assert list(gen.stream(ids, params))[-1]["finish_reason"] in ("stop", "length")
    cls = engines.load({**registry.load_entry("bert-cls", str(tmp_path))})
    assert cls.classify(["a happy dog"], [None])[0]["label"] in tiny.CLASS_LABELS
