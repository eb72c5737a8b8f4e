"""Security drills that need no Ray: no unsafe load anywhere in the sources, and a malicious pickle
planted in a checkpoint is never executed, never published, and alone is refused."""

from __future__ import annotations

from bench.drills import security
from serve import tiny


def test_sources_have_no_pickle_loads_or_remote_code():
    assert security.scan_sources() == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    pkg = tmp_path / "cluster"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import torch, pickle\nx = torch.load(p)\ny = pickle.loads(b)\n"
                                "ok = torch.load(p, weights_only=True)\n")
    (pkg / "remote.py").write_text("m = AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=False)\n")
    assert security.scan_sources(str(tmp_path)) == [
        "cluster/bad.py:2: torch.load without weights_only=True", "cluster/bad.py:3: pickle.loads",
        "cluster/remote.py:1: trust_remote_code=True"]


def test_planted_pickle_is_never_executed(tmp_path):
    checkpoint = tiny.save_bert(str(tmp_path / "cls"), "classification")
    findings = security.planted_pickle(checkpoint, str(tmp_path))
    assert all(f.passed for f in findings), [(f.figure, f.detail) for f in findings]
    assert not (tmp_path / "pickle-was-executed").exists()
