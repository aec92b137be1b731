"""Speed options through the real CLI: trainer.precision, trainer.compile, trainer.channels_last, and the
DataLoader path of file-backed data (persistent workers, in-memory decoding). Each keeps exact resume."""

import logging
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, cli, only_run, read_json, read_metrics
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from test_regression import PINNED_LOSSES, PINNED_TEST_TOP1
from test_resume import ARGS, PLUGIN, _assert_identical, _start, _wait_for_step
from torch import nn

from modrun.components.data.base import batches
from modrun.components.data.image_folder import image_folder
from modrun.core.registry import MODELS
from modrun.engine.speed import Speed


def _final(run: Path) -> dict:
    return read_json(run / "summary.json")["final"]


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run)]


def test_bf16_runs_and_stays_close_to_fp32():
    """The fp32 figures of this run are pinned in test_regression.py."""
    r = cli("train", *FAST, "seed=0", "trainer.log_every_steps=10", "trainer.precision=bf16")
    assert r.code == 0, r.text
    losses = [m["loss"] for m in read_metrics(only_run()) if m["split"] == "train"]
    assert [round(v, 4) for v in losses] != PINNED_LOSSES  # autocast really ran
    # bf16 matmuls round differently by CPU (native bf16 units or emulated): up to 15 % apart at step 30 measured
    assert losses == pytest.approx(PINNED_LOSSES, rel=0.2, abs=0.03)
    assert abs(_final(only_run())["test/top1"] - PINNED_TEST_TOP1) < 3


def test_fp16_mixed_on_cpu_is_one_line_of_bad_input():
    r = cli("train", *FAST, "trainer.precision=16-mixed")
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and "trainer.precision=bf16" in r.err, r.err
    assert "Traceback" not in r.text and not Path("runs").exists()
    r = cli("train", *FAST, "trainer.precision=fp16")
    assert r.code == 2 and "expected 32, bf16 or 16-mixed" in r.err


def test_compile_failure_on_first_step_falls_back_to_eager_exactly(monkeypatch):
    """A compiler that fails when the model first runs: one warning line, then the same run as eager."""
    args = [*FAST, "model.dropout=0.3", "trainer.log_every_steps=1"]  # dropout: the failed attempt drew numbers
    assert cli("train", *args, "--runs-dir", "eager").code == 0

    def broken_compile(fn, *a, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    r = cli("train", *args, "trainer.compile=true", "--runs-dir", "compiled")
    assert r.code == 0, r.text
    warnings = [line for line in r.text.splitlines() if "cannot compile" in line]
    assert len(warnings) == 1 and "(RuntimeError: no C++ compiler found); continuing eager" in warnings[0]
    eager, compiled = only_run(runs_dir=Path("eager")), only_run(runs_dir=Path("compiled"))
    assert _records(eager) == _records(compiled)
    assert (eager / "model.safetensors").read_bytes() == (compiled / "model.safetensors").read_bytes()


def test_compile_that_cannot_start_warns_and_stays_eager(monkeypatch, caplog):
    def refuse(*a, **kw):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    speed = Speed(OmegaConf.create({"compile": True}), torch.device("cpu"))
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="modrun"):
        speed.prepare(model, [model])
    assert speed.compiled is None and model._compiled_call_impl is None
    assert "cannot compile (RuntimeError: Dynamo is not supported" in caplog.text


@pytest.mark.slow  # a real torch.compile (inductor, C++) takes about a minute on a 2-core CPU with a cold cache
def test_compile_trains_and_saves_plain_keys():
    r = cli("train", *FAST, "trainer.compile=true")
    assert r.code == 0, r.text
    assert "cannot compile" not in r.text
    run = only_run()
    keys = set(load_file(run / "model.safetensors"))
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert keys == set(ckpt["modules"]["model"]) and not any("_orig_mod" in k for k in keys)
    assert _final(run)["val/top1"] > 80


def test_distill_with_channels_last_and_bf16_captures_features():
    """Hooks capture NHWC features (fitnet adapters, attention maps) under autocast."""
    save_file(MODELS.get("cnn_small")(1, 10, width=8).state_dict(), "teacher.safetensors")
    r = cli(
        "distill",
        *FAST,
        "model.width=8",
        "teacher.checkpoint=teacher.safetensors",
        "teacher.width=8",
        "kd=[kd,fitnet,at]",
        "trainer.channels_last=true",
        "trainer.precision=bf16",
    )
    assert r.code == 0, r.text
    last = [m for m in read_metrics(only_run("distill")) if m["split"] == "train"][-1]
    assert all(np.isfinite(last[k]) for k in ("loss", "kd_fitnet", "kd_at", "kd_kd"))


def test_teacher_forward_runs_under_autocast():
    from modrun.components.data.builtin import synthetic
    from modrun.methods.distill.objective import DistillObjective

    data = synthetic(size=8, val_size=2, test_size=2, image_size=8, channels=1)
    student, teacher = (MODELS.get("cnn_small")(1, 10, width=4) for _ in range(2))
    kd = OmegaConf.create({"task_weight": 1.0, "teacher_mode": "mean", "cache_teacher": False, "terms": {}})
    kd.terms = {"kd": {"name": "kd", "weight": 1.0, "temperature": 4.0}}
    objective = DistillObjective(student, [teacher], kd, data, torch.device("cpu"), Path("."))
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with Speed(OmegaConf.create({"precision": "bf16"}), torch.device("cpu")).autocast():
        objective.loss(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize(
    "option",
    [
        "trainer.precision=bf16",
        "trainer.channels_last=true",
        pytest.param("trainer.compile=true", marks=pytest.mark.slow),  # a cold compile takes about a minute here
    ],
)
def test_killed_run_resumes_bitwise(tmp_path, monkeypatch, option):
    """SIGKILL mid-epoch 2, resume: the same weights and metrics as an uninterrupted run with the option."""
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))  # the reference and the resume run in this process (faster)
    args = [a for a in ARGS if not a.startswith("trainer.epochs=")] + ["trainer.epochs=2", option]
    proc = _start(tmp_path, "killed", 0.03, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 25, proc)  # 20 steps an epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli("train", "--runs-dir", "ref", *args).code == 0
    done = cli("resume", str(run), "+imports=[slowplugin]")
    assert done.code == 0, done.text
    assert "resumed from step" in done.text
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)
    key, value = option.split("=")
    assert str(OmegaConf.select(OmegaConf.load(run / "config.yaml"), key)).lower() == value


def _write_images(root: Path, per_class: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_with_workers_is_deterministic_and_matches_in_memory(tmp_path):
    _write_images(tmp_path / "imgs")
    args = [
        *FAST,
        "trainer.epochs=2",
        "model.dropout=0.3",  # a run that draws random numbers: the loader must not draw any of them
        "trainer.log_every_steps=1",
        "data=image_folder",
        "data.path=imgs",
        "data.num_classes=3",
        "data.image_size=8",
        "data.batch_size=4",
        "data.num_workers=2",
    ]
    for name, memory in (("a", 0), ("b", 0), ("mem", 1024)):
        r = cli("train", *args, f"data.in_memory_mb={memory}", "--runs-dir", name)
        assert r.code == 0, r.text
    a, b, mem = (only_run(runs_dir=Path(n)) for n in ("a", "b", "mem"))
    assert _records(a) == _records(b) == _records(mem)
    assert "decoded into memory" in (mem / "log.txt").read_text()
    assert "decoded into memory" not in (a / "log.txt").read_text()


def test_file_loader_persists_across_epochs_and_skips_consumed_batches(tmp_path):
    _write_images(tmp_path / "imgs")
    split = image_folder(str(tmp_path / "imgs"), image_size=8, val_fraction=0.2, test_fraction=0.2).train
    rng = torch.get_rng_state()

    def epoch(e: int, start: int = 0) -> list[list[int]]:
        return [i.tolist() for _, _, i in batches(split, 3, seed=1, epoch=e, shuffle=True, start=start, num_workers=1)]

    first = epoch(0)
    workers = split.loaders[(1, False, 2)]._iterator._workers
    assert epoch(0, start=2) == first[2:] and epoch(1) != first
    assert split.loaders[(1, False, 2)]._iterator._workers == workers  # the same worker processes
    assert torch.equal(rng, torch.get_rng_state())  # reading files draws nothing from the global RNG
