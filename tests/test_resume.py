"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT) and resumed ends bitwise identical to an
uninterrupted run. These tests drive real subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import FAST, cli, cli_subprocess, only_run, read_json

# a model that can be slowed down from the environment, so that a kill reliably lands mid-run
PLUGIN = '''
import os, time
from modrun.components.models.cnn import SmallCNN
from modrun.core.registry import MODELS

class SlowCNN(SmallCNN):
    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW", "0")))
        return super().forward(x)

@MODELS.register("slow_cnn")
def slow_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0):
    """cnn_small that sleeps SLOW seconds per training step."""
    return SlowCNN(in_channels, num_classes, width, dropout)
'''
# dropout and augmentation make the run depend on every RNG and on the step-seeded crops
ARGS = [
    "+imports=[slowplugin]",
    "model.name=slow_cnn",
    "model.width=8",
    "model.dropout=0.3",
    "trainer.epochs=3",
    "trainer.checkpoint_every_steps=4",
    "trainer.log_every_steps=1",
    "data.augment.crop_padding=1",
    "seed=7",
]


def _env(tmp: Path, slow: float) -> dict:
    return {"PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SLOW": str(slow)}


def _start(tmp: Path, runs: str, slow: float, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modrun.cli", *cmd],
        cwd=tmp,
        env={**os.environ, **_env(tmp, slow)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(run_root: Path, step: int, proc: subprocess.Popen, timeout: float = 120, phase=None) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()}"
        for metrics in run_root.glob("*/*/metrics.jsonl"):
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
            if lines and lines[-1]["step"] >= step and lines[-1].get("phase") == phase:
                return metrics.parent
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the run")


def _assert_identical(a: Path, b: Path) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"] and sa["steps"] == sb["steps"]

    def records(run: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert records(a) == records(b)


def _imports(args: list[str]) -> list[str]:
    """The `+imports=[...]` of a run's arguments: a resume names them again (a run folder imports nothing itself)."""
    return [a for a in args if a.startswith("+imports=")]


def _killed_mid_run(run: Path, steps: int = 40) -> None:
    """A killed run of `steps` steps: still marked running, its last checkpoint inside the run."""
    assert read_json(run / "status.json")["state"] == "running"
    assert 0 < torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] < steps


def _kill_and_resume(
    tmp: Path, command: str, args: list[str], step: int, slow: float = 0.03, phase=None, killed=None
) -> tuple[Path, Path]:
    """Run `modrun COMMAND ARGS` to the end (the reference), then again, SIGKILLed once it logged `step` (of
    `phase`) and resumed; assert both end identical. `killed(run)` checks the killed run before it resumes.
    Returns (the resumed run, the reference)."""
    env = _env(tmp, 0)
    ref = cli_subprocess(command, "--runs-dir", "ref", *args, cwd=tmp, env=env)
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp, "killed", slow, command, "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp / "killed", step, proc, phase=phase)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed is not None:
        killed(run)
    done = cli_subprocess("resume", str(run), *_imports(args), cwd=tmp, env=env)
    assert done.returncode == 0, done.stderr
    reference = only_run(command, runs_dir=tmp / "ref")
    _assert_identical(reference, run)  # weights, final/best metrics and every metrics.jsonl record
    return run, reference


def test_sigkill_twice_then_resume_is_bitwise_identical(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    ref = cli_subprocess("train", "--runs-dir", "ref", *ARGS, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    reference = only_run(runs_dir=tmp_path / "ref")

    proc = _start(tmp_path, "killed", 0.03, "train", "--runs-dir", "killed", *ARGS)
    run = _wait_for_step(tmp_path / "killed", 27, proc)  # mid-epoch 2 (20 steps an epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(run / "status.json")["state"] == "running"  # a kill leaves no chance to say so
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ckpt["state"]["step"] < 60

    proc = _start(tmp_path, "killed", 0.03, "resume", str(run.relative_to(tmp_path)), *_imports(ARGS))
    deadline = time.time() + 120
    while ckpt["state"]["step"] >= torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a second kill, during the resumed session
    proc.wait()

    done = cli_subprocess("resume", str(run), *_imports(ARGS), cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    assert read_json(run / "status.json")["state"] == "completed"
    _assert_identical(reference, run)
    again = cli_subprocess("resume", str(run), *_imports(ARGS), cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout


def test_sigint_leaves_interrupted_resumable_run(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    ref = cli_subprocess("train", "--runs-dir", "ref", *ARGS, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "int", 0.03, "train", "--runs-dir", "int", *ARGS)
    run = _wait_for_step(tmp_path / "int", 13, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted" and "SIGINT" in status["error"]
    assert "Traceback" not in err and "modrun resume" in err
    done = cli_subprocess("resume", str(run), *_imports(ARGS), cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)


def test_nan_loss_fails_cleanly_and_keeps_last_good_checkpoint():
    r = cli("train", *FAST, "optim.lr=1e6", "trainer.checkpoint_every_steps=1")
    assert r.code == 1
    run = only_run()
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and "non-finite" in status["error"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["modules"]["model"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()


def test_bad_input_found_late_leaves_no_folder(tmp_path):
    Path("afile").write_text("not a folder")
    r = cli("train", "data=image_folder", "data.path=afile", "data.num_classes=2")
    assert r.code == 2 and "not a directory" in r.err
    assert not list(Path("runs").rglob("status.json"))


def test_distill_with_cache_and_memory_bank_resumes_bitwise(tmp_path):
    """Adapters, the CRD memory bank and its NCE constant Z, the teacher cache and DKD's warm-up (a function of
    the epoch) all live across a SIGKILL."""
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    env = _env(tmp_path, 0)
    teacher = cli_subprocess("train", "--runs-dir", "t", "trainer.epochs=1", "model.width=8", cwd=tmp_path, env=env)
    assert teacher.returncode == 0, teacher.stderr
    teacher_run = only_run(runs_dir=tmp_path / "t")
    args = [
        *ARGS,
        f"teacher.run={teacher_run}",
        "kd=[crd,fitnet,dkd]",
        "kd.terms.crd.nce_k=32",
        "kd.terms.dkd.warmup_epochs=3",
        "kd.cache_teacher=true",
        "data.augment.crop_padding=0",
    ]
    _kill_and_resume(tmp_path, "distill", args, 31)  # epoch 2: the cache is being read


def test_m2m_killed_inside_a_stage_phase_resumes_bitwise(tmp_path):
    """Module-to-module KD: a kill during phase 1 (stage 1) resumes in that stage and ends identical."""
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    env = _env(tmp_path, 0)
    teacher = cli_subprocess("train", "--runs-dir", "t", *ARGS[:3], "trainer.epochs=1", cwd=tmp_path, env=env)
    assert teacher.returncode == 0, teacher.stderr
    teacher_run = only_run(runs_dir=tmp_path / "t")
    args = [*ARGS[:3], *ARGS[5:], "trainer.epochs=1", f"teacher.run={teacher_run}", "kd=m2m", "kd.m2m.epochs=2"]

    def inside_stage_1(run: Path) -> None:
        assert (run / "checkpoints" / "m2m_stage0" / "done.json").exists()
        assert not (run / "checkpoints" / "m2m_stage1" / "done.json").exists()

    _kill_and_resume(tmp_path, "distill", args, 26, phase="m2m_stage1", killed=inside_stage_1)


def test_gradual_pruning_killed_mid_schedule_resumes_bitwise(tmp_path):
    """Masks and the schedule position live in the checkpoint."""
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    env = _env(tmp_path, 0)
    source = cli_subprocess("train", "--runs-dir", "s", *ARGS[:3], "trainer.epochs=1", cwd=tmp_path, env=env)
    assert source.returncode == 0, source.stderr
    args = [*ARGS, f"source.run={only_run(runs_dir=tmp_path / 's')}", "prune=gradual_magnitude", "prune.every=3"]
    _kill_and_resume(tmp_path, "prune", args, 23)
