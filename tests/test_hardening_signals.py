"""Hardening (issue #15): kills and signals outside the training loop, two resumes of one run, temp files left by
SIGKILL. Real `modrun` subprocesses; a model plugin sends a signal to its own process at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_subprocess, only_run, read_json
from test_resume import _assert_identical

# cnn_small that sends itself SIG_AT_EVAL="N:SIGNAME" at its N-th switch to eval mode (with trainer.epochs=E,
# switch E+1 starts the final test, after the last epoch's checkpoint) and sleeps SLOW seconds per training step;
# KILL_IN_WRITE="NAME:N" SIGKILLs the process inside the N-th atomic write of NAME (its temp file is on disk)
PLUGIN = '''
import os, signal, time
from modrun.components.models.cnn import SmallCNN
from modrun.core.registry import MODELS

_real_fsync, _writes = os.fsync, [0]

def _fsync(fd):
    if os.environ.get("KILL_IN_WRITE"):
        name, n = os.environ["KILL_IN_WRITE"].split(":")
        base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if base.startswith(f".{name}.") and base.endswith(".tmp"):
            _writes[0] += 1
            if _writes[0] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
    _real_fsync(fd)

os.fsync = _fsync

_evals = [0]

class SigCNN(SmallCNN):
    def train(self, mode=True):
        if not mode and os.environ.get("SIG_AT_EVAL"):
            _evals[0] += 1
            n, name = os.environ["SIG_AT_EVAL"].split(":")
            if _evals[0] == int(n):
                os.kill(os.getpid(), getattr(signal, name))
                time.sleep(1)  # the signal lands here, outside the training loop
        return super().train(mode)

    def forward(self, x):
        if self.training:
            time.sleep(float(os.environ.get("SLOW", "0")))
        return super().forward(x)

@MODELS.register("sig_cnn")
def sig_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0):
    """cnn_small that signals itself at its N-th switch to eval mode."""
    return SigCNN(in_channels, num_classes, width, dropout)
'''
ARGS = ["+imports=[sigplugin]", "model.name=sig_cnn", "model.width=8", "trainer.epochs=2", "trainer.progress=false"]
FINAL_TEST = "3"  # 2 epochs: two validations, then the final test


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    (tmp / "sigplugin.py").write_text(PLUGIN)
    return {"PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _start(tmp: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modrun.cli", *args],
        cwd=tmp,
        env={**os.environ, **_env(tmp, **env)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reference(tmp: Path, command: str = "train", *args: str) -> Path:
    ref = cli_subprocess(command, "--runs-dir", "ref", *ARGS, *args, cwd=tmp, env=_env(tmp))
    assert ref.returncode == 0, ref.stderr
    return only_run(command, tmp / "ref")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_after_the_last_checkpoint_resumes_to_the_same_final_metrics(tmp_path: Path, sig: str) -> None:
    """#15.5: a kill during the final test; the resumed run trains nothing, yet reports the same val/* metrics."""
    reference = _reference(tmp_path)
    env = _env(tmp_path, SIG_AT_EVAL=f"{FINAL_TEST}:{sig}")
    killed = cli_subprocess("train", "--runs-dir", "k", *ARGS, cwd=tmp_path, env=env)
    assert killed.returncode == (-9 if sig == "SIGKILL" else 130), killed.stderr
    run = only_run(runs_dir=tmp_path / "k")
    assert not (run / "summary.json").exists()
    done = cli_subprocess("resume", str(run), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "val/top1" in read_json(run / "summary.json")["final"]
    _assert_identical(reference, run)


@pytest.mark.parametrize("at", [FINAL_TEST, "1"], ids=["final-test", "first-validation"])
def test_sigterm_outside_the_loop_interrupts_the_run(tmp_path: Path, at: str) -> None:
    """#15.6: SIGTERM in the final test (or in an evaluation) is a Ctrl-C: 130, `interrupted`, resumable."""
    reference = _reference(tmp_path)
    env = _env(tmp_path, SIG_AT_EVAL=f"{at}:SIGTERM")
    stopped = cli_subprocess("train", "--runs-dir", "k", *ARGS, cwd=tmp_path, env=env)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    run = only_run(runs_dir=tmp_path / "k")
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted" and "SIGTERM" in status["error"], status
    assert f"modrun resume {run.relative_to(tmp_path)}" in stopped.stderr
    done = cli_subprocess("resume", str(run), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    _assert_identical(reference, run)


def test_sigterm_between_sweep_jobs_interrupts_the_sweep(tmp_path: Path) -> None:
    """#15.6: SIGTERM right after a sweep job completed: sweep.json `interrupted`, exit 130, `modrun resume` ends it."""
    proc = _start(tmp_path, "sweep", "train", *ARGS[:-2], "trainer.epochs=1", "seed=0,1,2")
    deadline = time.time() + 120
    while not [p for p in tmp_path.glob("runs/sweeps/*/000/status.json") if '"completed"' in p.read_text()]:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    sweep = next((tmp_path / "runs" / "sweeps").iterdir())
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "interrupted" and record["jobs"][0]["state"] == "completed", record
    done = cli_subprocess("resume", str(sweep), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "completed" and [j["state"] for j in record["jobs"]] == ["completed"] * 3


def test_two_resumes_of_one_run_train_it_once(tmp_path: Path) -> None:
    """#15.8: two `modrun resume` started together: one trains, the other says who does, in one line, exit 2."""
    reference = _reference(tmp_path)
    env = _env(tmp_path, SIG_AT_EVAL="1:SIGTERM")  # interrupted after epoch 1
    assert cli_subprocess("train", "--runs-dir", "k", *ARGS, cwd=tmp_path, env=env).returncode == 130
    run = only_run(runs_dir=tmp_path / "k")
    procs = [_start(tmp_path, "resume", str(run), "+imports=[sigplugin]", SLOW="0.1") for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(o[1] for p, o in zip(procs, outs, strict=True) if p.returncode == 2)
    assert len(err.strip().splitlines()) == 1 and "still running (pid" in err, err
    assert (run / "log.txt").read_text().count("resuming train run") == 1
    _assert_identical(reference, run)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_resume_removes_the_temp_files_a_sigkill_left(tmp_path: Path) -> None:
    """#15.9: SIGKILL inside the write of a checkpoint leaves .last.pt.*.tmp; resume removes it (and only it)."""
    reference = _reference(tmp_path, "train", "trainer.checkpoint_every_steps=5")
    env = _env(tmp_path, KILL_IN_WRITE="last.pt:3")
    killed = cli_subprocess(
        "train", "--runs-dir", "k", *ARGS, "trainer.checkpoint_every_steps=5", cwd=tmp_path, env=env
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = only_run(runs_dir=tmp_path / "k")
    left = list(run.rglob(".last.pt.*.tmp"))
    assert len(left) == 1, list(run.rglob("*"))
    mine = [run / "notes.tmp", run / ".notes.tmp", run.parent / ".last.pt.abcd1234.tmp"]  # not modrun's, or outside
    for path in mine:
        path.write_text("keep")
    done = cli_subprocess("resume", str(run), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run.rglob("*.tmp")) == [".notes.tmp", "notes.tmp"]
    assert all(path.read_text() == "keep" for path in mine)
    assert not left[0].exists() and "temp file" in (run / "log.txt").read_text()
    _assert_identical(reference, run)


def test_ctrl_c_while_the_teacher_trains_first_is_an_interruption(tmp_path: Path) -> None:
    """#15.7: `modrun distill` with no teacher trains one first; Ctrl-C in there interrupts both runs (130), and
    `modrun resume` of the distillation resumes the teacher, then distils."""
    args = ["+imports=[sigplugin]", "model.width=8", "teacher.name=sig_cnn", "teacher.width=8", "teacher.epochs=2"]
    args += ["trainer.epochs=1", "trainer.progress=false"]
    r = cli_subprocess("distill", *args, cwd=tmp_path, env=_env(tmp_path, SIG_AT_EVAL="1:SIGINT"))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    distill, teacher = only_run("distill", tmp_path / "runs"), only_run("train", tmp_path / "runs")
    assert read_json(distill / "status.json")["state"] == "interrupted"
    assert read_json(teacher / "status.json")["state"] == "interrupted"
    done = cli_subprocess("resume", str(distill), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert read_json(teacher / "status.json")["state"] == "completed" == read_json(distill / "status.json")["state"]
    assert [r["how"] for r in read_json(distill / "prerequisites.json")] == ["resumed"]
