"""jobs.distill on the shared local Ray: a half-depth student of the topic classifier learns from
its teacher (and more than alone), loads with transformers alone, publishes, resumes after a kill,
and configs that cannot work are refused before any worker starts."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import textwrap

import pandas as pd
import pytest

from cluster.config import load_config
from cluster.data import synthetic_tasks as synthetic
from cluster.stages.distill import DistillConfig
from cluster.stages.finetune import FinetuneConfig
from jobs import distill as distill_job
from jobs import finetune as finetune_job
from tests.conftest import PYTHON, REPO, subprocess_env

DATA = ["data.train_examples=1200", "data.validation_examples=200", "train.eval_batches=13",
        "scaling.threads_per_worker=1"]


def distill_config(name: str, *sets: str) -> DistillConfig:
    return load_config(DistillConfig, os.path.join(REPO, "configs", "distill-topic-tiny.yaml"),
                       [f"name={name}", *DATA, *sets])


def summary(name: str) -> dict:
    with open(os.path.join(os.environ["RAYLM_STORAGE"], "distill", name, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher(gpt_base):
    """The topic classifier fine-tuned from the tiny GPT (2 blocks): the teacher of every test here."""
    cfg = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune-topic-tiny.yaml"),
                      ["name=t-dist-teacher", f"model.checkpoint={gpt_base}", *DATA, "train.max_steps=120",
                       "train.eval_every=60", "train.checkpoint_every=60"])
    finetune_job.run(cfg)
    return "t-dist-teacher"


@pytest.fixture(scope="module")
def distilled(teacher):
    # A fresh student: one started from the teacher's first block already classifies these topics
    # as well as the teacher (the synthetic task saturates), leaving nothing to compare.
    distill_job.run(distill_config("t-distill", f"teacher={teacher}", "student.init=fresh", "train.max_steps=40",
                                   "train.eval_every=20", "train.checkpoint_every=20"))
    return summary("t-distill")


def test_half_depth_student_keeps_the_teachers_accuracy_and_beats_itself_trained_alone(distilled):
    teacher_acc = distilled["teacher"]["metrics"]["val_accuracy"]
    student, alone = distilled["final"]["metrics"], distilled["alone"]["final"]
    assert teacher_acc > 0.9  # a teacher worth distilling (4 classes)
    assert student["val_accuracy"] >= 0.97 * teacher_acc, distilled
    # Both students may reach the same accuracy on this easy task; the taught one gets there with
    # the lower validation loss (the task's own cross-entropy, without the soft term).
    assert student["val_accuracy"] >= alone["val_accuracy"], distilled
    assert student["val_loss"] < alone["val_loss"], distilled
    assert (distilled["student"]["layers"], distilled["teacher"]["layers"]) == (1, 2)
    assert distilled["student"]["params"] < distilled["teacher"]["params"]
    assert distilled["final"]["metrics"]["step"] == distilled["plan"]["max_steps"] == 40
    rows = [json.loads(line) for line in open(distilled["metrics"])]
    assert any("train_kd" in r for r in rows)  # the soft term was in the loss
    alone_rows = [json.loads(line) for line in open(distilled["alone"]["metrics"])]
    assert alone_rows and not any("train_kd" in r for r in alone_rows)


def test_student_checkpoint_classifies_with_transformers_alone(distilled, tmp_path):
    rows = synthetic.topic_classification(60, seed=11)
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    code = textwrap.dedent(f"""
        import sys, pandas as pd
        from transformers import pipeline
        assert not any(m.startswith(("cluster", "ray")) for m in sys.modules)
        rows = pd.read_csv({str(tmp_path / 'rows.csv')!r})
        clf = pipeline("text-classification", model={distilled['best']['checkpoint']!r})
        print(clf.model.config.num_hidden_layers)
        print(sum(p["label"] == gold for p, gold in zip(clf(list(rows.text)), rows.label)) / len(rows))
    """)
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                         env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-2000:]
    layers, accuracy = out.stdout.split()
    assert int(layers) == 1 and float(accuracy) >= 0.8 * distilled["final"]["metrics"]["val_accuracy"]


def test_a_distilled_run_publishes_its_student(distilled, tmp_path):
    out = subprocess.run([PYTHON, "-m", "jobs.cli", "publish", "t-distill", "--name", "t-topic-student",
                          "--root", str(tmp_path / "registry")], capture_output=True, text=True, cwd=REPO,
                         env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    entry = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert entry["task"] == "classification" and entry["metric"]["name"] == "val_accuracy"
    assert entry["metric"]["value"] == pytest.approx(distilled["best"]["metrics"]["val_accuracy"])


def test_a_killed_distillation_resumes_at_its_checkpoint(teacher, ray_session):
    # with the hidden-state term through the learned projection (a student half the teacher's width):
    # the resumed run must find the projection in the checkpoint's train_state/
    cfg = distill_config("t-dist-resume", f"teacher={teacher}", "compare_baseline=false", "train.max_steps=40",
                         "train.checkpoint_every=10", "train.eval_every=10", "train.log_every=1", "distill.hidden=0.5",
                         "student.init=fresh", "student.hidden_size=64", "student.heads=2")
    run_dir = os.path.join(os.environ["RAYLM_STORAGE"], "distill", cfg.name)
    path = os.path.join(os.environ["RAYLM_STORAGE"], f"{cfg.name}.yaml")
    with open(path, "w") as f:
        f.write(cfg.to_yaml())
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    with open(os.path.join(os.environ["RAYLM_STORAGE"], f"{cfg.name}.out"), "w") as out:
        victim = subprocess.Popen([PYTHON, "-m", "jobs.distill", "--config", path], cwd=REPO,
                                  env=subprocess_env(ray_session), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        import time

        deadline = time.time() + 300
        while not (os.path.exists(snapshot) and "checkpoint_0000010" in open(snapshot).read()):
            assert time.time() < deadline and victim.poll() is None, "no registered checkpoint before the kill"
            time.sleep(0.5)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    with open(snapshot) as f:
        resume_step = json.load(f)["latest_checkpoint_result"]["metrics"]["step"]

    distill_job.run(cfg)
    s = summary(cfg.name)
    rows = [json.loads(line) for line in open(s["metrics"])]
    assert [r["step"] for r in rows if r["split"] == "resume"] == [resume_step]
    assert s["final"]["metrics"]["step"] == 40 and s["teacher"]["metrics"]["val_accuracy"] > 0.5
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(r["train_kd_hidden_mse"] > 0 for r in train), train[-1]
    assert s["student"]["hidden_projection"] == [64, 128]
    ckpt = s["final"]["checkpoint"]
    assert os.path.exists(os.path.join(ckpt, "train_state", "train_only.safetensors"))
    from transformers import AutoModelForSequenceClassification

    _, info = AutoModelForSequenceClassification.from_pretrained(ckpt, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info


def test_a_sharded_student_learns_from_its_teacher_as_a_ddp_one_does(teacher):
    # FSDP2 over gloo on two CPU workers: the student is sharded, the teacher whole on each worker
    runs = {}
    for strategy in ("ddp", "fsdp"):
        distill_job.run(distill_config(f"t-dist-{strategy}", f"teacher={teacher}", "student.init=fresh",
                                       "compare_baseline=false", "scaling.num_workers=2", "train.batch_size=8",
                                       f"scaling.strategy={strategy}", "train.max_steps=20", "train.eval_every=20",
                                       "train.checkpoint_every=20", "train.log_every=5"))
        runs[strategy] = summary(f"t-dist-{strategy}")
    ddp, fsdp = (runs[k]["final"]["metrics"]["val_loss"] for k in ("ddp", "fsdp"))
    assert abs(fsdp - ddp) / ddp < 0.03, (ddp, fsdp)
    rows = [json.loads(line) for line in open(runs["fsdp"]["metrics"])]
    val = [r for r in rows if r["split"] == "validation"]
    assert val[-1]["val_loss"] < val[0]["val_loss"] and all("train_kd" in r for r in rows if r["split"] == "train")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(runs["fsdp"]["final"]["checkpoint"])
    assert model.config.num_hidden_layers == 1 and sum(p.numel() for p in model.parameters()) == \
        runs["fsdp"]["student"]["params"]


@pytest.mark.parametrize("sets, message", [
    (["student.layers=3"], "student.layers 3: student.init 'teacher_layers' copies teacher blocks, and the teacher has 2"),
    (["student.init=fresh", "student.hidden_size=100", "student.heads=3"], "hidden_size 100 is not a multiple of heads 3"),
    (["data.synthetic=entities", "task=tagging"], "distilling 'tagging' needs a teacher fine-tuned for it"),
    (["student.init=fresh", "student.hidden_size=16", "student.heads=2", "distill.hidden=1", "scaling.num_workers=2",
      "scaling.strategy=fsdp"], "distill.hidden: the student's width (16) is not the teacher's"),
])
def test_a_config_that_cannot_work_fails_before_any_worker_starts(teacher, sets, message, capsys):
    rc = distill_job.main(["--config", os.path.join(REPO, "configs", "distill-topic-tiny.yaml"),
                           "--set", "name=t-dist-bad", "--set", f"teacher={teacher}", *[a for s in sets for a in ("--set", s)]])
    assert rc == 1 and message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "distill", "t-dist-bad"))


def test_a_student_of_another_family_is_refused(teacher, tmp_path, capsys):
    from serve import tiny

    bert = tiny.save_bert(str(tmp_path / "bert"), "classification")
    rc = distill_job.main(["--config", os.path.join(REPO, "configs", "distill-topic-tiny.yaml"),
                           "--set", "name=t-dist-bad", "--set", f"teacher={teacher}", "--set", "student.init=checkpoint",
                           "--set", f"student.checkpoint={bert}", "--set", "student.layers=null"])
    assert rc == 1 and "is a bert model and the teacher a gpt2: distillation needs one family" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "distill", "t-dist-bad"))


def test_int8_classifier_answers_as_fp32_does_and_evaluate_reports_its_accuracy(teacher, tmp_path):
    from cluster import registry
    from cluster.runs import named_run, run_checkpoint
    from cluster.stages.evaluate import EvaluateConfig
    from jobs import evaluate as evaluate_job
    from serve import engines

    checkpoint = run_checkpoint(named_run(teacher))
    reg = str(tmp_path / "registry")
    registry.publish(checkpoint, "t-topic", "classification", root=reg)
    fp32, int8 = (engines.load(registry.load_entry("t-topic", reg), mode) for mode in (None, "int8"))
    assert (fp32.placement()["dtype"], int8.placement()["dtype"]) == ("float32", "int8")
    texts = [r["text"] for r in synthetic.topic_classification(200, seed=7)]
    labels = [[r["label"] for r in e.classify(texts, [None] * len(texts))] for e in (fp32, int8)]
    assert sum(a == b for a, b in zip(*labels, strict=True)) / len(texts) >= 0.95
    # and served: a deployment with quantize int8 answers /v1/classify with the fp32 model's labels
    import httpx
    from ray import serve

    from cluster.runtime import free_ports
    from serve.app import build_app

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"registry": reg, "models": ["t-topic"], "ingress": {"num_cpus": 0.05},
                             "per_model": {"t-topic": {"num_cpus": 0.25, "quantize": "int8"}}}),
                  name="raylm", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            card = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "t-topic")
            served = []
            for i in range(0, len(texts), 25):
                r = client.post("/v1/classify", json={"model": "t-topic", "inputs": texts[i: i + 25]})
                assert r.status_code == 200, r.text
                served += [x["label"] for x in r.json()["results"]]
    finally:
        serve.shutdown()
    assert "int8" in json.dumps(card)
    assert sum(a == b for a, b in zip(labels[0], served, strict=True)) / len(texts) >= 0.95

    def scored(mode: str) -> dict:
        cfg = load_config(EvaluateConfig, os.path.join(REPO, "configs", "evaluate-topic-tiny.yaml"),
                          [f"name=t-eval-{mode}", f"model={checkpoint}", f"quantize={mode}",
                           "data.validation_examples=200", "scaling.threads_per_worker=1"])
        with open(evaluate_job.run(cfg)) as f:
            return json.load(f)

    plain, quantized = scored("none"), scored("int8")
    assert quantized["quantize"] == "int8" and quantized["rows"] == plain["rows"] == 200
    assert abs(quantized["metrics"]["accuracy"] - plain["metrics"]["accuracy"]) <= 0.03


def test_a_half_depth_gpt_distilled_on_the_corpus_nears_its_teacher_and_beats_itself_alone(gpt_corpus):
    # A teacher trained as gpt-tiny.yaml trains it (300 steps, ~0.82 bits per byte): a student taught
    # by a teacher worse than what it reaches alone (gpt_base, 80 steps: 1.22) ends worse than alone.
    from tests.conftest import _pretrain

    teacher = _pretrain("t-dist-lm-teacher", "gpt-tiny.yaml", "t-gpt", ["train.eval_batches=8"])
    cfg = load_config(DistillConfig, os.path.join(REPO, "configs", "distill-gpt-tiny.yaml"),
                      ["name=t-dist-lm", f"teacher={teacher}", "corpus=t-gpt", "train.max_steps=60",
                       "train.eval_every=30", "train.checkpoint_every=30", "train.eval_batches=8"])
    s = summary_of(distill_job.run(cfg))
    teacher, student = s["teacher"]["metrics"]["val_bits_per_byte"], s["final"]["metrics"]["val_bits_per_byte"]
    alone = s["alone"]["final"]["val_bits_per_byte"]
    assert (s["student"]["layers"], s["teacher"]["layers"]) == (1, 2)
    assert student <= 1.05 * teacher and student < alone, (teacher, student, alone)
    assert s["entropy_floor_bpb"] < student


def test_a_corpus_the_teacher_cannot_read_is_refused_before_any_worker(gpt_base, bert_corpus, capsys):
    rc = distill_job.main(["--config", os.path.join(REPO, "configs", "distill-gpt-tiny.yaml"), "--set", "name=t-dist-bad",
                           "--set", f"teacher={gpt_base}", "--set", "corpus=t-bert"])
    assert rc == 1 and "has layout 'segments'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "distill", "t-dist-bad"))


def test_a_half_depth_bert_distilled_on_the_corpus_learns_the_teachers_masked_predictions(bert_base, bert_corpus,
                                                                                        tmp_path):
    # The masked-LM path: BertForPreTraining teacher and student (MLM + NSP), the soft term over the
    # masked tokens. bert_base is a short pretraining run, which a student also reaches alone (a
    # 900-step bert-tiny teacher at 4.51 nats: its 1-block student 4.48 after 300 steps, alone 4.48),
    # so this asserts the mechanics: a fresh student moves toward the teacher's masked predictions
    # (the KL falls; from teacher_layers it starts at ~0.001 nats and can only rise) and is a
    # fill-mask model.
    cfg = load_config(DistillConfig, os.path.join(REPO, "configs", "distill-bert-tiny.yaml"),
                      ["name=t-dist-mlm", f"teacher={bert_base}", "corpus=t-bert", "compare_baseline=false",
                       "student.init=fresh", "train.max_steps=40", "train.eval_every=40", "train.checkpoint_every=40",
                       "train.log_every=10", "train.eval_batches=4", "scaling.threads_per_worker=1"])
    s = summary_of(distill_job.run(cfg))
    assert s["task"] == "mlm" and "entropy_floor_bpb" not in s
    assert (s["student"]["layers"], s["teacher"]["layers"]) == (1, 2) and s["student"]["params"] < s["teacher"]["params"]
    rows = [json.loads(line) for line in open(s["metrics"])]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [0, 40] and val[-1]["val_mlm_loss"] < val[0]["val_mlm_loss"] - 0.5, val
    assert {"val_mlm_loss", "val_nsp_accuracy"} <= set(s["teacher"]["metrics"])
    kd = [r["train_kd"] for r in rows if r["split"] == "train"]
    assert len(kd) >= 4 and kd[-1] < kd[0] / 2, kd

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    ckpt = s["final"]["checkpoint"]
    model, tok = AutoModelForMaskedLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 1
    filled = pipeline("fill-mask", model=model, tokenizer=tok)(f"the cat sat on the {tok.mask_token} .", top_k=3)
    assert len(filled) == 3 and all(f["token"] not in tok.all_special_ids for f in filled)


@pytest.mark.parametrize("sets, message", [
    (["corpus=t-gpt"], "has layout 'blocks'; a masked LM (encoder) student learns from 'segments'"),
    (["objective.pair=sop"], "objective.pair 'sop': the teacher is a bert model, whose pretraining heads have NSP"),
])
def test_an_mlm_distillation_the_teacher_cannot_follow_is_refused_before_any_worker(bert_base, bert_corpus, gpt_corpus,
                                                                                    sets, message, capsys):
    rc = distill_job.main(["--config", os.path.join(REPO, "configs", "distill-bert-tiny.yaml"), "--set", "name=t-dist-bad",
                           "--set", f"teacher={bert_base}", "--set", "corpus=t-bert",
                           *[a for s in sets for a in ("--set", s)]])
    assert rc == 1 and message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.environ["RAYLM_STORAGE"], "distill", "t-dist-bad"))


def test_a_sweep_over_distillation_searches_the_soft_targets_and_publishes_the_best_student(teacher):
    from tune import sweep as sweep_job
    from tune.config import SweepConfig

    cfg = load_config(SweepConfig, os.path.join(REPO, "configs", "tune-distill-topic-tiny.yaml"), [
        "name=t-sw-dist", "publish.name=t-sw-dist", f"distill.teacher={teacher}", "distill.data.train_examples=600",
        "distill.data.validation_examples=120", "distill.train.eval_batches=5", "distill.train.max_steps=30",
        "distill.train.eval_every=15", "distill.scaling.threads_per_worker=1", "scheduler.kind=fifo",
        "distill.optim.lr=3e-3",
        "search={distill.alpha: {grid: [0.2, 0.9]}, student.layers: {grid: [1]}}", "num_samples=1"])
    from cluster import registry

    try:
        s = summary_of(sweep_job.run(cfg))
        _check_distill_sweep(s)
    finally:  # the session's registry is served whole by tests/integration/test_serve.py: leave it as found
        shutil.rmtree(registry.entry_path("t-sw-dist"), ignore_errors=True)


def _check_distill_sweep(s: dict) -> None:
    with open(s["results"]) as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["distill.alpha"]) for r in rows) == [0.2, 0.9] and all(r["status"] == "DONE" for r in rows)
    assert s["task"] == "classification" and s["registry"]["published"], s["registry"]
    assert (s["student"]["layers"], s["teacher"]["layers"]) == (1, 2) and s["student"]["params"] < s["teacher"]["params"]
    assert s["best"]["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows) > 0.5
    trial = [json.loads(line) for line in open(glob.glob(os.path.join(os.path.dirname(s["results"]), "trial_main_*",
                                                                       "metrics.jsonl"))[0])]
    assert any("train_kd" in r for r in trial)  # each trial learnt from the teacher
    with open(os.path.join(s["registry"]["path"], "model.json")) as f:
        entry = json.load(f)
    assert entry["task"] == "classification" and entry["config"]["distill"]["alpha"] in (0.2, 0.9)


def summary_of(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
