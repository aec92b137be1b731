"""`modrun distill` through the real CLI: teachers, KD terms, layer paths, several teachers, the cache."""

import json
from pathlib import Path

import torch
from conftest import FAST, cli, read_json, read_metrics
from omegaconf import OmegaConf

# student cnn_small width 8, teacher cnn_small width 16: a second or two per run
QUICK = [*FAST[:1], *FAST[2:], "teacher.width=16", "teacher.epochs=1"]  # a teacher of its own single epoch


def _runs(command: str) -> list[Path]:
    return sorted((Path("runs") / command).iterdir()) if (Path("runs") / command).exists() else []


def test_default_distill_trains_teacher_once_then_reuses_it():
    r = cli("distill", *QUICK)
    assert r.code == 0, r.text
    assert "teacher: none given, training cnn_small first" in r.err
    teacher_run = _runs("train")[0]
    assert read_json(teacher_run / "status.json")["state"] == "completed"
    run = _runs("distill")[0]
    summary = read_json(run / "summary.json")
    assert summary["teachers_frozen_verified"] is True and summary["teachers"][0]["source"] == "trained"
    assert read_json(run / "teacher.json")[0]["run"] == str(teacher_run)
    records = [m for m in read_metrics(run) if m["split"] == "train"]
    assert {"task_loss", "kd_kd"} <= records[0].keys()
    r = cli("distill", *QUICK, "seed=1")
    assert r.code == 0 and f"teacher: reusing {teacher_run}" in r.err
    assert len(_runs("train")) == 1
    assert "epoch 1/1" not in (run / "log.txt").read_text().split("teacher:")[0]  # teacher lines stay in its folder


def test_teacher_from_run_and_from_checkpoint():
    assert cli("train", *FAST, "model.width=16").code == 0
    teacher = _runs("train")[0]
    r = cli("distill", *QUICK, f"teacher.run={teacher}", "kd=dkd", "kd.beta=8")
    assert r.code == 0, r.text
    run = _runs("distill")[0]
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.kd.terms.dkd.beta == 8 and "kd_dkd" in read_metrics(run)[0]
    assert read_json(run / "teacher.json")[0]["source"] == "run"
    r = cli(
        "distill",
        *QUICK,
        "model@teacher=cnn_small",
        "teacher.width=16",
        f"teacher.checkpoint={teacher / 'model.safetensors'}",
        "kd=dist",
        "name=from_ckpt",
    )
    assert r.code == 0, r.text
    assert read_json(_runs("distill")[-1] / "teacher.json")[0]["source"] == "checkpoint"
    r = cli("distill", *QUICK, f"teacher.checkpoint={teacher / 'model.safetensors'}", "teacher.width=32")
    assert r.code == 2 and "do not fit the model" in r.err


def test_resnet_teacher_checkpoint_on_synthetic_with_features(tmp_path):
    synth = ["data=synthetic", "data.size=128", "data.image_size=16", "trainer.epochs=1"]
    assert cli("train", *synth, "model=resnet20", "model.width=0.5").code == 0
    weights = _runs("train")[0] / "model.safetensors"
    r = cli(
        "distill",
        *synth,
        "model=resnet20",
        "model.width=0.25",
        "model@teacher=resnet20",
        "teacher.width=0.5",
        f"teacher.checkpoint={weights}",
        "kd=fitnet",
        "kd.student_layer=layers.1",
        "kd.teacher_layer=layers.2",
    )
    assert r.code == 0, r.text
    ckpt = torch.load(_runs("distill")[0] / "checkpoints" / "last.pt", weights_only=True)
    adapter = ckpt["modules"]["kd"]["fitnet.0.adapters.0.0.weight"]
    assert tuple(adapter.shape) == (32, 8, 1, 1)  # 1x1 conv from student layers.1 (8 ch) to teacher layers.2 (32 ch)


def test_several_terms_mixed_and_each_logged():
    r = cli("distill", *QUICK, "kd=[kd,at]", "kd.terms.at.weight=100", "kd.task_weight=0.5")
    assert r.code == 0, r.text
    run = _runs("distill")[-1]
    cfg = OmegaConf.load(run / "config.yaml")
    assert set(cfg.kd.terms) == {"kd", "at"} and cfg.kd.terms.at.weight == 100
    record = next(m for m in read_metrics(run) if m["split"] == "train")
    assert {"kd_kd", "kd_at", "task_loss"} <= record.keys()
    epoch = next(m for m in read_metrics(run) if m["split"] == "train_epoch")
    assert "kd_at" in epoch


def test_two_teachers_mean_and_each():
    for w in (16, 32):
        assert cli("train", *FAST, f"model.width={w}", f"name=t{w}").code == 0
    a, b = _runs("train")
    for mode in ("mean", "each"):
        r = cli("distill", *QUICK, f"teacher.run=[{a},{b}]", f"kd.teacher_mode={mode}", f"name={mode}")
        assert r.code == 0, r.text
    runs = _runs("distill")
    assert all(len(read_json(r / "teacher.json")) == 2 for r in runs)
    assert all(len(read_json(r / "summary.json")["teacher_test_top1"]) == 2 for r in runs)


def test_teacher_cache_is_used_and_refused_with_augmentation():
    r = cli("distill", *QUICK, "kd.cache_teacher=true", "trainer.epochs=2")
    assert r.code == 0, r.text
    run = _runs("distill")[0]
    assert list((run / "teacher_cache").glob("*.f32"))
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert bool(ckpt["extra"]["teacher_cache"]["filled"].all())
    r = cli("distill", *QUICK, "kd.cache_teacher=true", "data.augment.hflip=true")
    assert r.code == 2 and "kd.cache_teacher=true needs deterministic inputs" in r.err


def test_distill_bad_inputs():
    cases = {
        ("kd=dkk",): "kd=dkk: no such kd config — did you mean dkd?",
        ("kd=dkd", "kd.betta=3"): "unknown key kd.terms.dkd.betta — did you mean kd.terms.dkd.beta?",
        ("teacher.run=nowhere",): "teacher.run=nowhere: not a modrun run folder",
        ("teacher.checkpoint=nowhere.pt",): "teacher.checkpoint=nowhere.pt: no such file",
        ("kd=fitnet", "kd.student_layer=features.9"): "kd.terms.fitnet.student_layer=features.9: no such module",
        ("kd=fitnet", "kd.teacher_layer=layers.1"): "did you mean",
        ("kd.teacher_mode=median",): "kd.teacher_mode=median: expected mean or each",
        ("+kd.terms.kd.tau=3",): "kd.terms.kd.tau: not an argument of kd method 'kd'",
        ("model@teacher=resnet2",): "no such model config — did you mean resnet20",
    }
    for overrides, message in cases.items():
        r = cli("distill", *overrides)
        assert r.code == 2, (overrides, r.text)
        assert message in r.err, (overrides, r.err)
        assert "Traceback" not in r.text
    assert not _runs("distill") and not _runs("train")


def test_distill_metrics_are_valid_json_lines():
    assert cli("distill", *QUICK, "kd=crd", "kd.nce_k=16").code == 0
    for line in (_runs("distill")[0] / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["step"], int)


def test_m2m_trains_each_stage_inside_the_teacher_then_the_student():
    stages = ["model=resnet20", "model.width=0.25", "model@teacher=resnet32", "teacher.width=0.25"]
    r = cli("distill", *stages, *FAST[:1], "kd=m2m", "kd.m2m.epochs=1", "teacher.epochs=1")
    assert r.code == 0, r.text
    assert "m2m phase 1, stage 2: student layers.2 inside the teacher in place of layers.2" in r.err
    run = _runs("distill")[0]
    summary = read_json(run / "summary.json")
    assert set(summary["m2m_phase1"]) == {"m2m_stage0", "m2m_stage1", "m2m_stage2"}
    phases = {m.get("phase") for m in read_metrics(run)}
    assert phases == {"m2m_stage0", "m2m_stage1", "m2m_stage2", None}
    stage_record = next(m for m in read_metrics(run) if m.get("phase") == "m2m_stage1" and m["split"] == "train")
    assert {"stage_loss", "logit_loss"} <= stage_record.keys()
    # narrower stages get adapters now (test_prerequisites); stages that do not pair up are still refused
    r = cli("distill", "kd=m2m", "kd.m2m.student_stages=features.0")
    assert r.code == 2 and "kd.m2m: 1 student stages but" in r.err
