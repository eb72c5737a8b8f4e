"""Distillation without Ray: the soft-target loss, the student's shape and initialisation from the
teacher, and the configs refused before any worker starts."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
)

from cluster.config import ConfigError, build
from cluster.errors import JobError
from cluster.objectives.distill import Distill, soft_target_nats
from cluster.objectives.tasks import SequenceClassification
from cluster.stages import distill as D
from cluster.stages import distill_student as S

LABELS = ["a", "b", "c"]


def gpt_teacher(layers: int = 4) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=layers, n_head=2,
                                                    num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_soft_target_loss_is_the_kl_at_the_temperature_and_zero_for_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    nats, n = soft_target_nats(s, t, 2.0)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                          log_target=True, reduction="sum")
    assert n == 4 and torch.allclose(nats, expected, atol=1e-5)
    assert float(soft_target_nats(t, t, 3.0)[0]) == pytest.approx(0.0, abs=1e-6)


def test_soft_target_loss_counts_only_the_positions_the_mask_keeps():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nats, n = soft_target_nats(s, t, 1.0, mask)
    changed = s.clone()
    changed[0, 2], changed[1, 1:] = 100.0, -100.0  # masked positions: anything
    assert n == 3 and torch.allclose(soft_target_nats(changed, t, 1.0, mask)[0], nats)


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
            "labels": torch.tensor([0, 2])}


def test_distill_loss_mixes_soft_and_hard_terms_and_evaluation_is_the_task_alone():
    student, teacher = gpt_teacher(1).train(), gpt_teacher(2).eval()
    task = SequenceClassification(LABELS, pad_id=0, token_types=False)
    torch.manual_seed(1)
    hard, stats = task.forward(student, _batch())  # no dropout in these models: every forward agrees
    for alpha, temperature in ((0.0, 2.0), (1.0, 2.0), (0.3, 4.0)):
        loss, dstats = Distill(task, teacher, alpha, temperature).forward(student, _batch())
        with torch.no_grad():
            s = student(input_ids=_batch()["input_ids"], attention_mask=_batch()["attention_mask"]).logits
            t = teacher(input_ids=_batch()["input_ids"], attention_mask=_batch()["attention_mask"]).logits
        soft = soft_target_nats(s, t, temperature)[0] / 2
        assert float(loss.detach()) == pytest.approx(float(alpha * temperature ** 2 * soft + (1 - alpha) * hard.detach()), rel=1e-4)
        assert float(dstats["nats"]) == pytest.approx(float(stats["nats"]))  # the task's own statistics go on
    loss.backward()  # the soft term trains the student, not the teacher
    assert student.score.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    student.eval()
    with torch.no_grad():
        loss, stats = Distill(task, teacher, 1.0, 2.0).forward(student, _batch())
        assert "kd_nats" not in stats and float(loss) == pytest.approx(float(task.forward(student, _batch())[0]))
    assert Distill(task, teacher, 0.5, 2.0).summarize({"nats": 2.0, "count": 2.0, "correct": 1.0, "kd_nats": 3.0,
                                                       "kd_positions": 2.0}) == {"loss": 1.0, "accuracy": 0.5, "kd": 1.5}


def test_student_shape_defaults_to_half_the_teachers_blocks_and_keeps_its_width():
    config = S.student_config(D.StudentSection(), gpt_teacher(4).config)
    assert (config.n_layer, config.n_embd, config.n_head, config.num_labels) == (2, 32, 2, 3)
    assert S.student_config(D.StudentSection(), gpt_teacher(3).config).n_layer == 2  # rounded up
    fresh = S.student_config(D.StudentSection(init="fresh", layers=1, hidden_size=16, heads=4, intermediate_size=24),
                             gpt_teacher(4).config)
    assert (fresh.n_layer, fresh.n_embd, fresh.n_head, fresh.n_inner) == (1, 16, 4, 24)
    llama = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=64)
    small = S.student_config(D.StudentSection(init="fresh", hidden_size=16, heads=2), llama)
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.num_key_value_heads,
            small.head_dim) == (2, 16, 2, 2, 8)


@pytest.mark.parametrize("student, message", [
    (D.StudentSection(layers=5), "a student larger than its teacher needs student.init 'fresh'"),
    (D.StudentSection(hidden_size=16), "student.hidden_size 16: student.init 'teacher_layers' copies the teacher's blocks"),
    (D.StudentSection(init="fresh", hidden_size=30, heads=4), "hidden_size 30 is not a multiple of heads 4"),
])
def test_student_shapes_that_cannot_work_are_refused_naming_the_key(student, message):
    with pytest.raises(JobError, match=message):
        S.student_config(student, gpt_teacher(4).config)


def test_teacher_layers_copies_embeddings_head_and_every_kth_block():
    teacher = gpt_teacher(4)
    student = GPT2ForSequenceClassification(S.student_config(D.StudentSection(), teacher.config))
    picks = S.picked_layers(4, 2)
    assert picks == [0, 2] and S.picked_layers(6, 3) == [0, 2, 4] and S.picked_layers(2, 1) == [0]
    S.copy_teacher_layers(student, teacher.state_dict(), picks)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"])
    assert torch.equal(s["score.weight"], t["score.weight"])
    assert torch.equal(s["transformer.h.1.attn.c_attn.weight"], t["transformer.h.2.attn.c_attn.weight"])
    assert torch.equal(s["transformer.h.0.mlp.c_fc.weight"], t["transformer.h.0.mlp.c_fc.weight"])
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    small = BertForSequenceClassification(S.student_config(D.StudentSection(layers=1), bert.config))
    S.copy_teacher_layers(small, bert.state_dict(), [1])
    assert torch.equal(small.state_dict()["bert.encoder.layer.0.output.dense.weight"],
                       bert.state_dict()["bert.encoder.layer.1.output.dense.weight"])


def test_configs_that_cannot_run_are_refused_before_anything_starts():
    base = {"task": "classification", "teacher": "t"}
    with pytest.raises(ConfigError, match="student.init 'checkpoint' needs student.checkpoint"):
        build(D.DistillConfig, {**base, "student": {"init": "checkpoint"}})
    with pytest.raises(ConfigError, match="student.checkpoint is read only with student.init 'checkpoint'"):
        build(D.DistillConfig, {**base, "student": {"checkpoint": "x"}})
    assert build(D.DistillConfig, {**base, "scaling": {"strategy": "fsdp", "num_workers": 2}}).scaling.strategy == "fsdp"
    with pytest.raises(ConfigError, match="generation with a model sharded across workers"):
        build(D.DistillConfig, {**base, "task": "completion", "scaling": {"strategy": "fsdp", "num_workers": 2}})
    with pytest.raises(ConfigError, match="alpha"):
        build(D.DistillConfig, {**base, "distill": {"alpha": 1.5}})
    for task in ("lm", "mlm"):
        with pytest.raises(ConfigError, match="tasks 'lm' and 'mlm' distil on a prepared corpus"):
            build(D.DistillConfig, {**base, "task": task})
        assert build(D.DistillConfig, {**base, "task": task, "corpus": "c"}).corpus == "c"
    with pytest.raises(ConfigError, match="tasks 'lm' and 'mlm' distil on a prepared corpus"):
        build(D.DistillConfig, {**base, "corpus": "c"})
    cfg = build(D.DistillConfig, base)
    assert cfg.model is cfg.student and cfg.as_finetune("/ckpt").model.checkpoint == "/ckpt"


def test_a_teacher_without_the_tasks_head_or_with_other_labels_is_refused():
    with pytest.raises(JobError, match=r"needs a teacher fine-tuned for it \(fine-tune one with jobs.finetune: a "
                       r"\*ForSequenceClassification\)"):
        D.check_teacher("classification", {"architectures": ["GPT2LMHeadModel"]}, "/m")
    D.check_teacher("completion", {"architectures": ["GPT2LMHeadModel"]}, "/m")
    D.check_teacher("mlm", {"architectures": ["BertForPreTraining"]}, "/m")
    D.check_teacher("mlm", {"architectures": ["RobertaForMaskedLM"]}, "/m")
    with pytest.raises(JobError, match=r"distilling 'mlm' needs a teacher pretrained \(pretrain one with "
                       r"jobs.pretrain: a \*ForPreTraining or \*ForMaskedLM\)"):
        D.check_teacher("mlm", {"architectures": ["BertForSequenceClassification"]}, "/m")
    teacher = {"id2label": {"0": "a", "1": "b", "2": "c"}}
    D.check_labels(teacher, LABELS, "/m")
    with pytest.raises(JobError, match=r"trained for labels \['a', 'b', 'c'\], the data has \['a', 'c', 'b'\]"):
        D.check_labels(teacher, ["a", "c", "b"], "/m")


def test_a_student_checkpoint_of_another_family_or_tokenizer_is_refused(tmp_path):
    from serve import tiny

    gpt = tiny.save_gpt(str(tmp_path / "gpt"), max_len=16)
    teacher = GPT2ForSequenceClassification.from_pretrained(gpt, num_labels=3)
    teacher.save_pretrained(tmp_path / "teacher")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gpt).save_pretrained(tmp_path / "teacher")
    bert = tiny.save_bert(str(tmp_path / "bert"), "classification")
    cfg = build(D.DistillConfig, {"task": "classification", "teacher": "t",
                                  "student": {"init": "checkpoint", "checkpoint": bert}})
    teacher_cfg = D.base_config(str(tmp_path / "teacher"))
    with pytest.raises(JobError, match="is a bert model and the teacher a gpt2: distillation needs one family"):
        D.plan_student(cfg, str(tmp_path / "teacher"), teacher_cfg)
    other = tmp_path / "other-gpt"
    tiny.save_gpt(str(other), max_len=16)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(other)
    cfg = build(D.DistillConfig, {"task": "classification", "teacher": "t",
                                  "student": {"init": "checkpoint", "checkpoint": str(other)}})
    with pytest.raises(JobError, match="have different tokenizers"):
        D.plan_student(cfg, str(tmp_path / "teacher"), teacher_cfg)
    half = D.plan_student(build(D.DistillConfig, {"task": "classification", "teacher": "t"}),
                          str(tmp_path / "teacher"), teacher_cfg)
    assert (half["layers"], half["teacher_layers"], half["picks"]) == (1, 2, [0])
    assert 0 < half["params"] < half["teacher_params"]


def test_a_run_that_distils_another_teacher_is_not_resumed(tmp_path, monkeypatch):
    # The check runs on the driver before the run folder is touched: a re-submitted run whose
    # teacher now names another checkpoint would go on training a student of the first.
    from cluster import storage

    run = tmp_path / "distill" / "s"
    run.mkdir(parents=True)
    storage.write_json_atomic(str(run / D.TEACHER_FILE), {"checkpoint": "/old/teacher", "metrics": {}})
    cfg = build(D.DistillConfig, {"task": "classification", "teacher": "t", "name": "s"})
    monkeypatch.setattr(D, "resolve_teacher", lambda name, root: "/new/teacher")
    monkeypatch.setattr(D, "base_config", lambda *a, **k: {"architectures": ["GPT2ForSequenceClassification"]})
    monkeypatch.setattr(D, "plan_student", lambda *a: {"layers": 1, "teacher_layers": 2, "init": "fresh",
                                                       "params": 1, "teacher_params": 2})
    monkeypatch.setattr(D.finetune, "setup", lambda *a, **k: type("T", (), {"meta": {"labels": None}})())
    with pytest.raises(JobError, match="distils from teacher /old/teacher, and teacher now names /new/teacher"):
        D.distill(cfg, root=str(tmp_path))
    assert not (run / "config.yaml").exists()


def test_a_causal_lm_student_learns_from_every_position_of_the_teacher():
    # Regression: Distill read `metrics` from its task objective, which the corpus objectives lack.
    from transformers import GPT2LMHeadModel

    from cluster.objectives.lm import CausalLM

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                        eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    student, teacher = GPT2LMHeadModel(config).train(), GPT2LMHeadModel(config).eval()
    task = CausalLM(bytes_per_token=2.0)
    ids = {"input_ids": torch.randint(2, 50, (2, 8))}
    loss, stats = Distill(task, teacher, 1.0, 1.0).forward(student, ids)
    assert float(stats["kd_positions"]) == 16  # no attention mask: every position of both rows
    with torch.no_grad():
        s, t = student(**ids).logits, teacher(**ids).logits
    assert float(loss.detach()) == pytest.approx(float(soft_target_nats(s, t, 1.0)[0] / 16), rel=1e-4)
    assert "bits_per_byte" in Distill(task, teacher, 1.0, 1.0).summarize({**{k: float(v) for k, v in stats.items()}})


def test_the_hidden_state_term_adds_the_masked_mse_of_the_last_hidden_states():
    from cluster.objectives.distill import hidden_state_sq_error

    student, teacher = gpt_teacher(1).train(), gpt_teacher(2).eval()
    task = SequenceClassification(LABELS, pad_id=0, token_types=False)
    batch = _batch()
    hard, _ = task.forward(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"].float()
    mse = float((((s.hidden_states[-1] - t.hidden_states[-1]) ** 2).mean(-1) * mask).sum() / mask.sum())
    assert mse > 0
    soft = float(soft_target_nats(s.logits, t.logits, 2.0)[0] / 2)
    loss, stats = Distill(task, teacher, 0.3, 2.0, hidden=0.5).forward(student, batch)
    assert float(loss.detach()) == pytest.approx(0.3 * 4 * soft + 0.7 * float(hard.detach()) + 0.5 * mse, rel=1e-4)
    assert Distill(task, teacher, 0.3, 2.0).summarize({k: float(v) for k, v in stats.items()})["kd_hidden_mse"] == \
        pytest.approx(mse, rel=1e-4)
    # alpha 0: the task loss and the hidden-state term, still with the teacher
    loss0, _ = Distill(task, teacher, 0.0, 2.0, hidden=2.0).forward(student, batch)
    assert float(loss0.detach()) == pytest.approx(float(hard.detach()) + 2.0 * mse, rel=1e-4)
    loss0.backward()  # the term trains the student's blocks, never the teacher
    assert student.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # masked positions do not count; other widths are refused
    changed = s.hidden_states[-1].clone()
    changed[1, 3] += 100.0
    assert torch.allclose(hidden_state_sq_error(changed, t.hidden_states[-1], batch["attention_mask"])[0],
                          hidden_state_sq_error(s.hidden_states[-1], t.hidden_states[-1], batch["attention_mask"])[0])
    with pytest.raises(ValueError, match="needs the teacher's width"):
        hidden_state_sq_error(torch.zeros(1, 2, 16), torch.zeros(1, 2, 32))


def test_a_hidden_state_term_between_other_widths_is_refused_only_with_fsdp(tmp_path):
    teacher = gpt_teacher(4)
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_cfg = teacher.config.to_dict()
    narrow = {"task": "classification", "teacher": "t", "distill": {"hidden": 1.0},
              "student": {"init": "fresh", "hidden_size": 16, "heads": 2}}
    assert D.plan_student(build(D.DistillConfig, narrow), str(tmp_path / "teacher"), teacher_cfg)["projection"] == [16, 32]
    sharded = build(D.DistillConfig, {**narrow, "scaling": {"strategy": "fsdp", "num_workers": 2}})
    with pytest.raises(JobError, match=r"distill.hidden: the student's width \(16\) is not the teacher's \(32\), and the "
                       r"learned projection between them runs with scaling.strategy 'ddp' only"):
        D.plan_student(sharded, str(tmp_path / "teacher"), teacher_cfg)
    same = build(D.DistillConfig, {"task": "classification", "teacher": "t", "distill": {"hidden": 1.0}})
    plan = D.plan_student(same, str(tmp_path / "teacher"), teacher_cfg)
    assert (plan["layers"], plan["projection"]) == (2, None)


def test_a_narrower_student_learns_the_teachers_hidden_states_through_a_projection_kept_out_of_its_export(tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from cluster.objectives.distill import PROJECTION
    from cluster.train.checkpoint import STATE_DIR, TRAIN_ONLY_FILE, TrainState, restore, save_checkpoint
    from serve import tiny

    teacher = gpt_teacher(2).eval()  # width 32
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = build(D.DistillConfig, {"task": "classification", "teacher": "t", "distill": {"hidden": 1.0, "alpha": 0.0},
                                  "student": {"init": "fresh", "hidden_size": 16, "heads": 2}})
    plan = D.plan_student(cfg, str(tmp_path / "teacher"), teacher.config.to_dict())
    meta = {"teacher": str(tmp_path / "teacher"), "student": plan, "pad_id": 0}
    student = D.build_student(cfg, meta, teacher).train()
    assert getattr(student, PROJECTION).weight.shape == (32, 16)
    assert not hasattr(D.build_student(cfg, meta, None), PROJECTION)  # trained alone: no teacher, no projection

    task = SequenceClassification(LABELS, pad_id=0, token_types=False)
    batch = _batch()
    hard, _ = task.forward(student, batch)
    loss, stats = Distill(task, teacher, 0.0, 2.0, hidden=1.0).forward(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"].float()
        projected = getattr(student, PROJECTION)(s.hidden_states[-1])
        mse = float((((projected - t.hidden_states[-1]) ** 2).mean(-1) * mask).sum() / mask.sum())
    assert float(loss.detach()) == pytest.approx(float(hard.detach()) + mse, rel=1e-4)
    loss.backward()
    assert getattr(student, PROJECTION).weight.grad.abs().sum() > 0  # the projection learns with the student

    # checkpoint: the export is the student alone (loads with transformers, no unused weights); the
    # projection is in train_state/ and comes back on resume
    tok = AutoTokenizer.from_pretrained(tiny.save_gpt(str(tmp_path / "gpt"), max_len=16))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt.step()
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, student, tok, opt, sched, TrainState(step=1), {}, rank=0)
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if PROJECTION in k]
    assert (tmp_path / "ckpt" / STATE_DIR / TRAIN_ONLY_FILE).exists()
    exported, info = GPT2ForSequenceClassification.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not hasattr(exported, PROJECTION)
    resumed = D.build_student(cfg, meta, teacher)
    with torch.no_grad():
        getattr(resumed, PROJECTION).weight.zero_()
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    restore(ckpt, resumed, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0))
    assert torch.equal(getattr(resumed, PROJECTION).weight, getattr(student, PROJECTION).weight)
    assert torch.equal(resumed.score.weight, student.score.weight)


def _bert_pretraining(layers: int):
    from transformers import BertForPreTraining

    torch.manual_seed(layers)
    return BertForPreTraining(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_a_masked_lm_student_learns_the_teachers_distribution_at_the_masked_tokens_only():
    # The soft term reads BertForPreTraining's `prediction_logits` (it has no `logits`) and averages
    # over the tokens the MLM labels score, not over every position the attention mask keeps.
    from cluster.objectives.distill import _token_logits

    class Task:  # the masked-LM objective's call and loss, with its labels
        name = "mlm"

        def forward(self, model, inputs):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return torch.nn.functional.cross_entropy(out.prediction_logits.flatten(0, 1), inputs["labels"].flatten(),
                                                     ignore_index=-100), {}

    student, teacher = _bert_pretraining(1).train(), _bert_pretraining(2).eval()
    ids = torch.randint(5, 40, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 4], labels[1, 5] = ids[0, 1], ids[1, 4], ids[1, 5]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    hard, _ = Task().forward(student, inputs)
    loss, stats = Distill(Task(), teacher, 0.4, 2.0, positions="labels").forward(student, inputs)
    assert float(stats["kd_positions"]) == 3
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=inputs["attention_mask"]).prediction_logits
        t = teacher(input_ids=ids, attention_mask=inputs["attention_mask"]).prediction_logits
    kept = labels != -100
    soft = float(soft_target_nats(s[kept], t[kept], 2.0)[0] / 3)
    assert float(loss.detach()) == pytest.approx(0.4 * 4 * soft + 0.6 * float(hard.detach()), rel=1e-4)
    _, every = Distill(Task(), teacher, 0.4, 2.0).forward(student, inputs)  # positions="attention": all 12
    assert float(every["kd_positions"]) == 12
    assert float(every["kd_nats"]) == pytest.approx(float(soft_target_nats(s, t, 2.0)[0]), rel=1e-4)
    assert _token_logits(type("Out", (), {"logits": t})()) is t


def test_an_encoder_student_gets_the_teachers_pretraining_heads_and_every_kth_block(tmp_path):
    teacher = _bert_pretraining(4)
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = build(D.DistillConfig, {"task": "mlm", "teacher": "t", "corpus": "c"})
    plan = D.plan_student(cfg, str(tmp_path / "teacher"), teacher.config.to_dict())
    assert (plan["layers"], plan["picks"]) == (2, [0, 2]) and plan["params"] < plan["teacher_params"]
    student = D.build_student(cfg, {"teacher": str(tmp_path / "teacher"), "student": plan, "pad_id": 0}, teacher)
    assert type(student).__name__ == "BertForPreTraining" and student.config.num_hidden_layers == 2
    assert torch.equal(student.state_dict()["bert.encoder.layer.1.output.dense.weight"],
                       teacher.state_dict()["bert.encoder.layer.2.output.dense.weight"])
    assert torch.equal(student.state_dict()["cls.seq_relationship.weight"],
                       teacher.state_dict()["cls.seq_relationship.weight"])


def test_the_teachers_context_counts_the_position_slots_roberta_leaves_unused():
    from cluster.stages.distill_corpus import teacher_context

    assert teacher_context({"model_type": "bert", "max_position_embeddings": 128}) == 128
    # hf_config gives a RoBERTa of max_len 128 with pad 1 max_position_embeddings 131: positions 2..130
    assert teacher_context({"model_type": "roberta", "max_position_embeddings": 131, "pad_token_id": 1}) == 129
    assert teacher_context({"model_type": "gpt2", "n_positions": 64}) == 64


def test_a_sweep_over_a_distillation_checks_its_keys_and_refuses_what_trials_cannot_run():
    from tune.config import SweepConfig, check_sweep

    base = {"name": "s", "distill": {"task": "classification", "teacher": "t"},
            "search": {"distill.alpha": {"uniform": [0.1, 0.9]}, "student.layers": {"randint": [1, 3]}}}
    cfg = build(SweepConfig, base)
    check_sweep(cfg)
    assert (cfg.base is cfg.distill, cfg.base_key, cfg.objective) == (True, "distill", ("val_accuracy", "max"))
    assert cfg.search["student.layers"].values() == [1, 2]  # randint's high is excluded
    with pytest.raises(ConfigError, match="give exactly one of finetune"):
        build(SweepConfig, {"name": "s"})
    with pytest.raises(ConfigError, match="give exactly one of finetune"):
        build(SweepConfig, {**base, "finetune": {"task": "classification", "model": {"checkpoint": "x"}}})
    with pytest.raises(ConfigError, match="distill.task 'lm': a sweep distils on a fine-tuning task's data"):
        build(SweepConfig, {**base, "distill": {"task": "lm", "teacher": "t", "corpus": "c"}})
    with pytest.raises(ConfigError, match="distill.compare_baseline: a sweep's trials train with the teacher only"):
        build(SweepConfig, {**base, "distill": {**base["distill"], "compare_baseline": True}})
    problems = {"distill.alpha": {"uniform": [0.5, 1.5]}, "teacher": {"choice": ["a", "b"]},
                "strategy.kind": {"choice": ["lora"]}}
    with pytest.raises(ConfigError) as err:
        check_sweep(build(SweepConfig, {**base, "search": problems}))
    text = str(err.value)
    assert "3 problem(s)" in text and "search keys ['teacher']" in text and "distill.*, student.* shape" in text
    assert "search key 'distill.alpha'" in text and "'strategy'" in text


def test_a_distillation_sweep_plans_every_searched_student_against_the_teacher_before_any_trial(tmp_path):
    from cluster.runs import RunDir
    from tune.config import SweepConfig
    from tune.driver import base_setup

    teacher = gpt_teacher(2)
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = build(SweepConfig, {"name": "s", "distill": {"task": "classification", "teacher": str(tmp_path / "teacher")},
                              "search": {"student.layers": {"choice": [1, 3]}}})
    with pytest.raises(JobError, match=r"search key 'student.layers' -> 3: student.layers 3: student.init "
                       r"'teacher_layers' copies teacher blocks, and the teacher has 2"):
        base_setup(cfg, str(tmp_path), RunDir("tune", "s", str(tmp_path)), fits=None)


def test_the_teacher_runs_at_the_training_precision_when_no_outer_autocast_covers_it():
    # Under FSDP the loop computes in the student's bf16 policy with autocast off; the whole (not
    # sharded) teacher then runs under its own autocast, else it would run in fp32.
    student, teacher = gpt_teacher(1).train(), gpt_teacher(2).eval()
    task = SequenceClassification(LABELS, pad_id=0, token_types=False)
    seen = []
    teacher.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    Distill(task, teacher, 0.5, 2.0, teacher_autocast=torch.bfloat16).forward(student, _batch())
    Distill(task, teacher, 0.5, 2.0).forward(student, _batch())
    assert seen == [torch.bfloat16, torch.float32]
