"""jobs.prepare on the shared local Ray: manifest contract, determinism, and bad input."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest

from cluster import storage
from cluster.data.corpus import Corpus
from jobs import prepare as prepare_job
from tests.conftest import REPO


def test_manifest_counts_reconcile_and_shards_match(gpt_corpus):
    m = gpt_corpus.manifest
    docs, splits = m["documents"], m["splits"]
    # `after_weighting` is counted from the dataset itself, independently of the drop counters.
    assert docs["in"] - sum(docs["dropped"].values()) == docs["after_weighting"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == docs["after_weighting"]
    assert splits["validation"]["documents"] > 0.05 * docs["after_weighting"]
    for shard in m["shards"]:
        path = os.path.join(gpt_corpus.path, shard["file"])
        assert pq.ParquetFile(path).metadata.num_rows == shard["rows"]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
        assert pq.read_table(path).column("input_ids").to_pylist()[0].__len__() == m["block_size"]
    for split in ("train", "validation"):
        s = splits[split]
        assert s["rows"] == sum(sh["rows"] for sh in m["shards"] if sh["split"] == split)
        assert s["tokens_packed"] == s["rows"] * m["block_size"]
        # only the tail of each packing batch is dropped: less than one block per 4096 documents
        assert 0 <= s["tokens"] - s["tokens_packed"] < m["block_size"] * (s["documents"] // 4096 + 1)
    assert len(m["shards"]) > 2  # output.shard_mb was set small: several shards per split


def test_synthetic_manifest_carries_the_entropy_floor(gpt_corpus):
    floor = gpt_corpus.manifest["entropy_floor_bpb"]
    assert set(floor) == {"train", "validation"}
    assert 0.3 < floor["validation"] < 3.0


def test_tokenizer_saved_beside_shards_loads_with_transformers(gpt_corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt_corpus.tokenizer_path)
    assert len(tok) == gpt_corpus.manifest["tokenizer"]["vocab_size"]
    assert tok.eos_token_id == gpt_corpus.manifest["tokenizer"]["eod_id"]


def test_rerun_reproduces_identical_shards(gpt_corpus, ray_session):
    cfg_path = os.path.join(gpt_corpus.path, "config.yaml")
    assert prepare_job.main(["--config", cfg_path, "--set", "name=t-gpt-again"]) == 0
    again = Corpus.open("t-gpt-again")
    strip = lambda m: [(os.path.basename(s["file"]), s["rows"], s["sha256"]) for s in m["shards"]]  # noqa: E731
    assert strip(again.manifest) == strip(gpt_corpus.manifest)
    assert again.manifest["tokenizer"]["hash"] == gpt_corpus.manifest["tokenizer"]["hash"]


def _sha256_ok(corpus: Corpus) -> bool:
    return all(hashlib.sha256(open(os.path.join(corpus.path, s["file"]), "rb").read()).hexdigest() == s["sha256"]
               for s in corpus.manifest["shards"])


def test_a_failed_reprepare_keeps_the_previous_corpus(ray_session, capsys, monkeypatch):
    """Re-preparing a name builds the new corpus beside the one the name stands for: a run that fails
    after writing its shards leaves the previous corpus as it was (manifest, shards, tokenizer,
    summary), and a pretraining run reads it; a run that succeeds then replaces it whole. Neither
    leaves a build folder behind."""
    from cluster.stages import prepare as stage
    from jobs import pretrain as pretrain_job

    args = ["--config", os.path.join(REPO, "configs", "prepare-synthetic.yaml"), "--set", "name=t-keep",
            "--set", "sources.0.num_docs=600", "--set", "tokenizer.vocab_size=512",
            "--set", "split.validation_fraction=0.1", "--set", "output.shard_mb=0.05"]
    assert prepare_job.main(args) == 0
    before = Corpus.open("t-keep")
    summary = storage.read_json(os.path.join(before.path, "summary.json"))
    prepare_dir = os.path.dirname(before.path)

    def fail_after_the_shards(local: str, dest: str) -> None:
        assert os.listdir(os.path.join(os.path.dirname(dest), "shards", "train"))  # the new shards, beside
        assert Corpus.open("t-keep").manifest == before.manifest
        raise PermissionError(f"injected: cannot write '{dest}'")

    with monkeypatch.context() as m:
        m.setattr(stage, "_upload_tokenizer", fail_after_the_shards)
        assert prepare_job.main([*args, "--set", "sources.0.seed=1"]) == 1
    assert "injected: cannot write" in capsys.readouterr().err
    kept = Corpus.open("t-keep")
    assert (kept.path, kept.manifest) == (before.path, before.manifest) and _sha256_ok(kept)
    assert storage.read_json(os.path.join(kept.path, "summary.json")) == summary
    assert [e for e in os.listdir(prepare_dir) if e.startswith(".t-keep.")] == []
    assert pretrain_job.main(["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--set", "name=t-keep-pre",
                              "--set", "corpus=t-keep", "--set", "train.max_steps=2", "--set", "train.eval_every=2",
                              "--set", "train.checkpoint_every=2", "--set", "train.eval_batches=1",
                              "--set", "optim.warmup_steps=1", "--set", "scaling.threads_per_worker=2"]) == 0

    assert prepare_job.main([*args, "--set", "sources.0.seed=1"]) == 0
    replaced = Corpus.open("t-keep")
    assert replaced.manifest["shards"] != before.manifest["shards"] and _sha256_ok(replaced)
    assert storage.exists(os.path.join(replaced.path, "summary.json"))
    assert [e for e in os.listdir(prepare_dir) if e.startswith(".t-keep.")] == []


def test_files_cli_counts_every_dropped_document(tmp_path, ray_session, capsys):
    good = [{"text": f"Document number {i} talks about clusters and models at length."} for i in range(40)]
    lines = [json.dumps(d).encode() for d in good]
    lines += [lines[0], lines[1]]  # two exact duplicates
    lines += [json.dumps({"text": "tiny"}).encode()]  # too short
    lines += [b'{"text": "broken \xff bytes here, long enough to keep"}']  # undecodable
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "notes.txt").write_text("\x1b[1mBold\x1b[0m note, 中文也可以保留下来。 " * 3)
    rc = prepare_job.main([str(tmp_path / "a.jsonl"), str(tmp_path / "*.txt"), "--name", "t-files",
                           "--set", "tokenizer.vocab_size=300", "--set", "split.validation_fraction=0.2"])
    assert rc == 0
    summary_path = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary_path.endswith("prepare/t-files/summary.json")
    m = Corpus.open("t-files").manifest
    assert m["documents"]["in"] == 45
    assert m["documents"]["dropped"] == {"duplicate": 2, "too_short": 1, "undecodable": 1}
    assert m["documents"]["after_weighting"] == 41
    assert any("a.jsonl:44: invalid UTF-8" in p for p in m["problems"])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "x.txt").write_bytes(b"\x00\x01binary\x00" * 100), "x.txt: looks like a binary file"),
        (lambda d: (d / "x.txt").write_text("short"), "is empty after filtering"),
        # raised inside a Ray Data task: the message is ours alone, without Ray's retry advice
        (lambda d: (d / "x.txt").write_text("ok line\n" * 10 + "y" * 3000), "x.txt:11: line longer than"),
        # kept, but too little text for one block: a manifest with no training row used to be written
        (lambda d: (d / "x.txt").write_text("A short note that is kept but fills no block."),
         "has no training row: its 1 train document(s) hold"),
    ],
    ids=["missing", "binary", "empty-after-filtering", "huge-line", "no-training-row"],
)
def test_bad_input_fails_clearly_and_writes_no_manifest(tmp_path, ray_session, capsys, setup, message):
    setup(tmp_path)
    rc = prepare_job.main([str(tmp_path / "x.txt"), "--name", "t-bad", "--set", "clean.max_line_mb=0.001"])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert "Traceback" not in err and "retr" not in err
    assert not storage.exists(os.path.join(os.environ["RAYLM_STORAGE"], "prepare", "t-bad", "manifest.json"))


def test_a_few_files_still_hold_out_a_validation_row(tmp_path, ray_session):
    """30 text files at the default validation_fraction (0.02), none of which the split hash holds
    out: `raylm prepare` gave a corpus with no validation rows, and pretraining refused it. The
    train document the hash would hold out next now moves to validation, and only that one."""
    import random

    from transformers import AutoTokenizer

    from cluster.data.packing import split_of
    from cluster.data.text import content_hash, hash_unit

    rng, texts = random.Random(0), []
    words = "cluster model token shard worker replica metric batch corpus layer".split()
    while len(texts) < 30:  # already clean text, so these hashes are the ones prepare computes
        text = " ".join(rng.choice(words) for _ in range(120)) + "."
        if split_of(content_hash(text), 0.02, 0) == "train":
            texts.append(text)
    for i, text in enumerate(texts):
        (tmp_path / f"note{i:02d}.txt").write_text(text)
    next_out = min(texts, key=lambda t: hash_unit(content_hash(t), salt=0))

    assert prepare_job.main([str(tmp_path / "*.txt"), "--name", "t-few-files", "--set", "tokenizer.vocab_size=300",
                             "--set", "pack.block_size=64"]) == 0
    corpus = Corpus.open("t-few-files")
    splits = corpus.manifest["splits"]
    assert splits["validation"]["documents"] == 1 and splits["train"]["documents"] == 29
    assert splits["validation"]["rows"] >= 1 and splits["train"]["rows"] >= 29
    tok = AutoTokenizer.from_pretrained(corpus.local_tokenizer_dir())
    (first,) = pq.read_table(corpus.shard_paths("validation")[0]).column("input_ids").to_pylist()[:1]
    assert next_out.startswith(tok.decode(first).strip())
    train_text = "".join(tok.decode(ids) for p in corpus.shard_paths("train")
                         for ids in pq.read_table(p).column("input_ids").to_pylist())
    assert tok.decode(first).strip() not in train_text


@pytest.mark.parametrize("reuse_tokenizer", [False, True], ids=["trained-tokenizer", "reused-tokenizer"])
def test_a_corpus_weighted_away_entirely_fails_clearly(tmp_path, ray_session, reuse_tokenizer):
    """Selection is fused into tokenization (not materialised on its own), so a corpus whose every
    kept document has weight 0 is found empty later than the drop filters; it must still fail by
    name and leave no manifest."""
    from cluster.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    from cluster.errors import CorpusError
    from cluster.stages.prepare import PrepareConfig, prepare

    texts = [f"Document {i} tells a long enough story about clusters." for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer: dict = {"vocab_size": 300}
    if reuse_tokenizer:
        save_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=300)), str(tmp_path / "tok"))
        tokenizer = {"path": str(tmp_path / "tok")}
    cfg = PrepareConfig.model_validate({
        "name": "t-weighted-away", "tokenizer": tokenizer,
        "sources": [{"kind": "files", "paths": [str(tmp_path / "a.jsonl")], "weight": 0}],
    })
    with pytest.raises(CorpusError, match="t-weighted-away.*(weighted away|weight of 0)"):
        prepare(cfg)
    assert not storage.exists(os.path.join(os.environ["RAYLM_STORAGE"], "prepare", "t-weighted-away", "manifest.json"))


def test_reused_tokenizer_and_file_parts_count_the_same_corpus(tmp_path, ray_session):
    """With a reused tokenizer, reading, cleaning and tokenizing run fused per part of a file and
    duplicates are dropped only at packing; a JSONL file read in ~40 parts must still give exactly
    the counts of the run that read it whole and trained the tokenizer (every document once, the
    same drops, duplicates, problems, weighted copies, tokens and bytes per split)."""
    from cluster.stages.prepare import PrepareConfig, prepare

    lines = [json.dumps({"text": f"Document {i} says {'more ' * (i % 7)}about clusters, models and data."}).encode()
             for i in range(300)]
    lines += lines[10:30]  # duplicates
    lines += [json.dumps({"text": "tiny"}).encode(), b'{"text": "broken \xff bytes, but long enough to keep"}']
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines[::3]) + b"\n")

    def run(name: str, tokenizer: dict, part_mb: float) -> dict:
        files = lambda f, w: {"kind": "files", "name": f, "paths": [str(tmp_path / f)],  # noqa: E731
                              "weight": w, "part_mb": part_mb}
        cfg = PrepareConfig.model_validate({
            "name": name, "tokenizer": tokenizer, "split": {"validation_fraction": 0.2},
            "sources": [files("a.jsonl", 1.0), files("b.jsonl", 1.5)],
        })
        prepare(cfg)
        return Corpus.open(name).manifest

    whole = run("t-whole", {"vocab_size": 300}, part_mb=64)
    parts = run("t-parts", {"path": os.path.join(Corpus.open("t-whole").tokenizer_path)}, part_mb=0.0005)
    assert whole["documents"] == parts["documents"]
    # b.jsonl repeats every third line of a.jsonl: 107 duplicates there, its last line the broken one
    assert whole["documents"]["dropped"] == {"duplicate": 20 + 107, "too_short": 1, "undecodable": 2}
    assert sorted(whole["problems"]) == sorted(parts["problems"])  # (their order follows the blocks')
    assert sorted(p.split("/")[-1] for p in parts["problems"]) == ["a.jsonl:322: invalid UTF-8 at byte 17 (undecodable)",
                                                              "b.jsonl:108: invalid UTF-8 at byte 17 (undecodable)"]
    for split in ("train", "validation"):
        for key in ("documents", "tokens", "bytes"):
            assert whole["splits"][split][key] == parts["splits"][split][key], (split, key)
    assert parts["tokenizer"]["hash"] == whole["tokenizer"]["hash"]


def test_hf_dataset_source_in_parts_counts_like_the_same_file(tmp_path, ray_session):
    """A Hugging Face dataset (the `json` builder on a local file) is cut into blocks of about
    part_mb for the fused read/clean/tokenize stage; it must count the same corpus as the file."""
    from cluster.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    from cluster.stages.prepare import PrepareConfig, prepare

    texts = [f"Record {i} holds {'several ' * (i % 5)}words about Ray Data and tokenizers." for i in range(200)]
    texts += texts[:10]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    save_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=300)), str(tmp_path / "tok"))

    def run(name: str, source: dict) -> dict:
        prepare(PrepareConfig.model_validate({"name": name, "tokenizer": {"path": str(tmp_path / "tok")},
                                              "sources": [source]}))
        return Corpus.open(name).manifest

    files = run("t-as-files", {"kind": "files", "name": "d", "paths": [str(tmp_path / "d.jsonl")]})
    hf = run("t-as-hf", {"kind": "hf", "name": "d", "dataset": "json", "data_files": [str(tmp_path / "d.jsonl")],
                         "part_mb": 0.001})
    assert hf["documents"] == files["documents"] and hf["documents"]["dropped"] == {"duplicate": 10}
    assert hf["splits"] == files["splits"]


def test_storage_that_cannot_be_written_fails_with_one_message(tmp_path, ray_session, capsys, monkeypatch):
    """prepare let pyarrow's OSError out as a traceback; the other jobs named the folder."""
    (tmp_path / "x.txt").write_text("A line of text long enough to keep.\n" * 20)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RAYLM_STORAGE", str(blocker / "runs"))
    rc = prepare_job.main([str(tmp_path / "x.txt"), "--name", "t-ro"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"storage '{blocker / 'runs' / 'prepare' / 't-ro'}' is not writable" in err
    assert "Traceback" not in err


def test_the_tokenizer_sees_every_source_in_proportion_and_short_chinese_lines(tmp_path, ray_session):
    """English then Chinese, a tokenizer sample of about a quarter: both sources are in it in
    proportion (the first train_docs documents were all English), Chinese lines of 12 characters
    pass min_chars 20, and the WordPiece tokenizer keeps each ideograph whole. A byte cap draws a
    smaller sample of both sources."""
    import random

    from cluster.data.tokenizer import load_tokenizer
    from cluster.stages.prepare import PrepareConfig, prepare

    rnd = random.Random(0)
    chars = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    en = [f"Document {i} says {'more ' * (i % 7)}about clusters, models and data." for i in range(600)]
    zh = ["".join(rnd.choice(chars) for _ in range(11)) + "。" for _ in range(600)]
    for name, texts in (("en.jsonl", en), ("zh.jsonl", zh)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))

    def run(name: str, tokenizer: dict) -> Corpus:
        prepare(PrepareConfig.model_validate({
            "name": name, "tokenizer": {"kind": "wordpiece", "vocab_size": 1200, "min_frequency": 1, **tokenizer},
            "pack": {"block_size": 64},
            "sources": [{"kind": "files", "name": f, "paths": [str(tmp_path / f)]} for f in ("en.jsonl", "zh.jsonl")],
        }))
        return Corpus.open(name)

    corpus = run("t-two-scripts", {"train_docs": 300})
    sample = corpus.manifest["tokenizer"]["sample"]
    assert corpus.manifest["documents"]["dropped"].get("too_short", 0) == 0
    assert 100 <= sample["per_source"]["en.jsonl"] <= 200 and 100 <= sample["per_source"]["zh.jsonl"] <= 200, sample
    assert sample["documents"] == sum(sample["per_source"].values()) and not sample["capped"]
    tok = load_tokenizer(corpus.tokenizer_path)
    assert len(tok("".join(rnd.choice(chars) for _ in range(500)), add_special_tokens=False).input_ids) == 500

    # A byte cap far below the draw's size shrinks the draw (~57 KB of training text: ~3%), so the
    # cap does not cut the sample in corpus order: the Chinese source, listed last, is still in it.
    capped = run("t-two-scripts-capped", {"train_docs": 300, "train_bytes": 2000}).manifest["tokenizer"]["sample"]
    assert capped["fraction"] < 0.05 and capped["bytes"] <= 2000 and 0 < capped["documents"] < 100, capped
    assert capped["per_source"]["en.jsonl"] >= 5 and capped["per_source"]["zh.jsonl"] >= 5, capped


def test_near_duplicates_are_found_and_distinct_documents_kept(tmp_path, ray_session):
    """300 distinct documents of ~130 words, 100 copies of the first 100 with one word changed
    (Jaccard ~0.92 over word 5-grams) and 10 exact copies: near-duplicate removal drops >= 95 of the
    100 and < 1% of the distinct ones, and exact copies stay exact de-duplication's."""
    from cluster.data import synthetic
    from cluster.stages.prepare import PrepareConfig, prepare

    parts = [d.text for d in synthetic.documents(900, seed=11)]
    distinct = [" ".join(parts[i:i + 3]) for i in range(0, 900, 3)]

    def changed(text: str) -> str:
        words = text.split()
        words[len(words) // 2] = "zebra"
        return " ".join(words)

    def run(name: str, texts: list[str]) -> dict:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare(PrepareConfig.model_validate({
            "name": name, "tokenizer": {"vocab_size": 400}, "pack": {"block_size": 64},
            "clean": {"near_dedup": {"threshold": 0.8, "num_perm": 128, "ngram": 5}},
            "sources": [{"kind": "files", "paths": [str(tmp_path / f"{name}.jsonl")]}],
        }))
        return Corpus.open(name).manifest["documents"]["dropped"]

    alone = run("t-near-distinct", distinct)
    assert alone.get("near_duplicate", 0) < 3, alone
    dropped = run("t-near-injected", distinct + [changed(t) for t in distinct[:100]] + distinct[200:210])
    assert 95 <= dropped["near_duplicate"] <= 100 + alone.get("near_duplicate", 0), dropped
    assert dropped["duplicate"] == 10
