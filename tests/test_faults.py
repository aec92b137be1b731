"""Fault injection: a run killed (SIGKILL) at 10 random steps and stopped once by SIGTERM/SIGINT ends bitwise
identical to an uninterrupted run, for train, distill and gradual pruning; a full disk fails cleanly and
resumes; runs started together in one runs folder keep apart.

The kill tests drive real subprocesses with a model that sleeps while it trains (see test_resume.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, only_run, read_json
from test_resume import ARGS, _assert_identical, _start, _wait_for_step

KILLS = 10
SLOW = 0.01  # seconds per training forward: a step lasts long enough to be hit, the whole chain stays short
STEPS = 60  # ARGS: 3 epochs of 20 steps (digits, batch 64)
# test_resume's slow_cnn, sleeping only in training mode: evaluation and the latency measurements of pruning
# run the model hundreds of times and would otherwise dominate every resumed session
PLUGIN = '''
import os, time
from modrun.components.models.cnn import SmallCNN
from modrun.core.registry import MODELS

class SlowCNN(SmallCNN):
    def forward(self, x):
        if self.training:
            time.sleep(float(os.environ.get("SLOW", "0")))
        return super().forward(x)

@MODELS.register("slow_cnn")
def slow_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0):
    """cnn_small that sleeps SLOW seconds per training step."""
    return SlowCNN(in_channels, num_classes, width, dropout)
'''


# each chain starts 13 processes (~4 s each before the first step on 2 cores: torch and torch._dynamo imports);
# 83-95 s per chain on the 2-core dev machine, too long for the default run: `pytest -m slow tests/test_faults.py`
SLOW_CHAIN = pytest.mark.slow


def kill_steps(seed: int, n: int = KILLS + 1, gap: int = 4, total: int = STEPS) -> list[int]:
    """`n` increasing steps in [2, total - 3], at least `gap` apart, from a seeded generator (repeatable)."""
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(2, total - 2 - (n - 1) * (gap - 1)), n))
    return [p + i * (gap - 1) for i, p in enumerate(picks)]


def _last_step(run: Path) -> int:
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def _weights(path: Path, width: int = 8) -> str:
    """Weights of a cnn_small (a teacher, a model to prune) made here: no training run needed."""
    from safetensors.torch import save_file

    from modrun.core.registry import MODELS

    torch.manual_seed(1)
    model = MODELS.get("cnn_small")(in_channels=1, num_classes=10, width=width)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _kill_chain(tmp: Path, command: str, args: list[str], seed: int, stop: signal.Signals) -> None:
    """SIGKILL at KILLS seeded random steps, each followed by `modrun resume`, then `stop` (SIGTERM/SIGINT) at a
    later step, then a resume to the end; compared with a reference run that goes on meanwhile."""
    (tmp / "slowplugin.py").write_text(PLUGIN)  # found through _start's PYTHONPATH
    t0 = time.time()
    ref = _start(tmp, "ref", 0, command, "--runs-dir", "ref", *args)  # runs beside the chain (2 cores)
    steps = kill_steps(seed)
    print(f"\n{command}: SIGKILL at steps {steps[:-1]}, {stop.name} at step {steps[-1]} (seed {seed})")
    proc = _start(tmp, "killed", SLOW, command, "--runs-dir", "killed", *args)
    reached, landed = 0, []
    for i, step in enumerate(steps):
        # never before the previous session's last record: that would be a stale read, not a kill
        run = _wait_for_step(tmp / "killed", max(step, reached + 1), proc)
        proc.send_signal(signal.SIGKILL if i < KILLS else stop)
        _, err = proc.communicate(timeout=120)
        reached = _last_step(run)
        landed.append(reached)
        if i == KILLS:  # the graceful stop: a checkpoint at that step, status interrupted, exit 130
            assert proc.returncode == 130 and "Traceback" not in err, err
            status = read_json(run / "status.json")
            assert status["state"] == "interrupted" and stop.name in status["error"], status
        else:
            assert proc.returncode == -signal.SIGKILL
        proc = _start(tmp, "killed", SLOW, "resume", str(run.relative_to(tmp)))
    print(f"{command}: last records at the stops {landed}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert read_json(run / "status.json")["state"] == "completed"
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    _assert_identical(only_run(command, tmp / "ref"), run)
    print(f"{command}: {KILLS} kills + {stop.name} + resumes, identical end, {time.time() - t0:.1f} s")


@SLOW_CHAIN
def test_train_killed_at_ten_random_steps_ends_bitwise_identical(tmp_path: Path) -> None:
    _kill_chain(tmp_path, "train", ARGS, seed=1, stop=signal.SIGTERM)


@SLOW_CHAIN
def test_distill_killed_at_ten_random_steps_ends_bitwise_identical(tmp_path: Path) -> None:
    teacher = _weights(tmp_path / "teacher.safetensors")
    args = [*ARGS, "model@teacher=cnn_small", "teacher.width=8", f"teacher.checkpoint={teacher}", "kd=[kd,fitnet]"]
    _kill_chain(tmp_path, "distill", args, seed=2, stop=signal.SIGINT)


@SLOW_CHAIN
def test_gradual_pruning_killed_at_ten_random_steps_ends_bitwise_identical(tmp_path: Path) -> None:
    source = _weights(tmp_path / "source.safetensors")
    args = [*ARGS, f"source.checkpoint={source}", "prune=gradual_magnitude", "prune.every=3"]
    _kill_chain(tmp_path, "prune", args, seed=3, stop=signal.SIGTERM)


class _SigtermCNN:
    """Holder of the switch for `sigterm_cnn` (registered on first use): the training forward number `at` sends
    SIGTERM to this very process, so the stop lands at a known step without a second process."""

    at: int | None = None
    calls = 0


def _register_sigterm_cnn() -> None:
    from modrun.components.models.cnn import SmallCNN
    from modrun.core.registry import MODELS

    if "sigterm_cnn" in MODELS:
        return

    class SigtermCNN(SmallCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and _SigtermCNN.at is not None:
                _SigtermCNN.calls += 1
                if _SigtermCNN.calls == _SigtermCNN.at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(x)

    @MODELS.register("sigterm_cnn")
    def sigterm_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> SmallCNN:
        """cnn_small that sends SIGTERM to its own process at a chosen training step."""
        return SigtermCNN(in_channels, num_classes, width, dropout)


def test_sigterm_checkpoints_stops_with_130_and_resumes_identically() -> None:
    """SIGTERM (what schedulers and `kill` send) in the default suite; the kill chains above add more."""
    _register_sigterm_cnn()
    args = [*FAST, "model.name=sigterm_cnn", "trainer.checkpoint_every_steps=10"]
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a signal landing after the run must not end pytest
    try:
        _SigtermCNN.at, _SigtermCNN.calls = 23, 0
        r = cli("train", *args)
    finally:
        _SigtermCNN.at = None
        signal.signal(signal.SIGTERM, previous)
    assert r.code == 130 and "Traceback" not in r.text, r.text
    run = only_run()
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted" and "SIGTERM at step 23" in status["error"], status
    assert f"modrun resume {run}" in r.err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 23
    assert cli("resume", str(run)).code == 0
    assert cli("train", *args, "runs_dir=ref").code == 0
    _assert_identical(only_run(runs_dir=Path("ref")), run)


# --- a full disk ---------------------------------------------------------------------------------------------


class DiskFull:
    """Stands in for os.fsync, which every atomic write calls before its rename: after `after` good writes of
    files named `name` (any file when None) the next one fails with ENOSPC, like a write that no longer fits;
    with `stays_full` every write fails from then on, as on a disk that nobody empties."""

    def __init__(self, after: int, name: str | None = None, stays_full: bool = True) -> None:
        self.after, self.name, self.stays_full = after, name, stays_full
        self.real, self.seen, self.failed, self.last_good = os.fsync, 0, 0, None

    def _ours(self, base: str) -> bool:
        # atomic_write's temp files are .<name>.<random>.tmp; the checksum sidecar (<name>.sha256) is not <name>
        return self.name is None or (base.startswith(f".{self.name}.") and not base.startswith(f".{self.name}.sha"))

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        ours = self._ours(os.path.basename(path))
        if (self.failed and self.stays_full) or (ours and self.seen >= self.after and not self.failed):
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)
        if ours:
            self.seen += 1
            self.last_good = hashlib.sha256(Path(path).read_bytes()).hexdigest()


pytestmark_linux = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
FULL_ARGS = [*FAST, "trainer.epochs=2", "trainer.checkpoint_every_steps=7", "trainer.log_every_steps=5"]


@pytestmark_linux
@pytest.mark.parametrize("stays_full", [True, False], ids=["disk-stays-full", "one-write-fails"])
def test_full_disk_fails_cleanly_keeps_the_checkpoint_and_resumes(monkeypatch: pytest.MonkeyPatch, stays_full: bool):
    from modrun.core import checkpoint

    full = DiskFull(after=4, name="last.pt", stays_full=stays_full)  # the 5th checkpoint does not fit
    with monkeypatch.context() as patch:  # (not monkeypatch.undo(): that would undo the test's chdir too)
        patch.setattr(os, "fsync", full)
        r = cli("train", *FULL_ARGS)
    # space is freed
    assert r.code == 1 and full.failed, r.text
    assert "Traceback" not in r.text
    run = only_run()
    errors = [line for line in r.err.splitlines() if "No space left on device" in line]
    assert len(errors) == 1 and " failed: " in errors[0] and f"modrun resume {run}" in errors[0], r.err
    log = (run / "log.txt").read_text().splitlines()
    assert all(line in log for line in r.err.strip().splitlines()), "the console showed more than log.txt"
    status = read_json(run / "status.json")
    if stays_full:  # status.json could not be written either: the line says so, the file says running
        assert status["state"] == "running" and "status.json not updated" in errors[0]
    else:
        assert status["state"] == "failed" and "No space left on device" in status["error"]
    assert not list(run.rglob("*.tmp")), "atomic_write left a temp file"
    # the last checkpoint that fitted is on disk, whole (last.pt, or last.prev.pt when the failure came after
    # checkpoint.save moved last.pt aside), and loads with weights_only=True
    ckpt_dir = run / "checkpoints"
    kept = [p for p in (ckpt_dir / "last.pt", ckpt_dir / "last.prev.pt") if p.is_file()]
    digests = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in kept}
    assert full.last_good in digests, (full.last_good, kept)
    state = torch.load(digests[full.last_good], weights_only=True)
    assert checkpoint.load_last(ckpt_dir)["state"]["step"] == state["state"]["step"] > 0
    done = cli("resume", str(run))
    assert done.code == 0, done.text
    assert read_json(run / "status.json")["state"] == "completed"
    assert cli("train", *FULL_ARGS, "runs_dir=ref").code == 0
    _assert_identical(only_run(runs_dir=Path("ref")), run)


@pytestmark_linux
def test_full_disk_before_any_work_is_bad_input_and_leaves_no_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", DiskFull(after=0))  # not even config.yaml fits
        r = cli("train", *FAST)
    assert r.code == 2 and "Traceback" not in r.text, r.text
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modrun: error: ") and "No space left on device" in lines[0]
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


# --- runs that start together ---------------------------------------------------------------------------------

# every clock reading of the run-folder module says the same second, so two runs cannot differ by time
FROZEN_CLOCK = """
import datetime as _dt
import modrun.core.runfolder

class _Frozen(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5, tzinfo=tz)

modrun.core.runfolder.datetime = _Frozen
"""


def test_two_runs_with_one_name_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    """The single-run twin of test_sweep.py::test_two_sweeps_started_together_get_their_own_folders: two
    `modrun train name=twin` processes started at once, in a second frozen for both, into one runs folder."""
    (tmp_path / "frozenclock.py").write_text(FROZEN_CLOCK)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "modrun.cli", "train", *FAST, "+imports=[frozenclock]", "name=twin"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = sorted(p.name for p in (tmp_path / "runs" / "train").iterdir())
    assert runs == ["2030-01-02_03-04-05_twin", "2030-01-02_03-04-05_twin_2"], runs
    pids = set()
    for name in runs:
        run = tmp_path / "runs" / "train" / name
        status = read_json(run / "status.json")
        assert status["state"] == "completed" and (run / "model.safetensors").is_file()
        pids.add(status["pid"])
    assert len(pids) == 2  # each process wrote its own folder
