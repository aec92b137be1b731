"""Hardening (issue #15): `modrun resume SWEEP` goes on past a bad job, and resumes a sweep made with --config-dir.
Real `modrun` subprocesses; the sweep is SIGKILLed inside a checkpoint write of its second job (test plugin)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import cli_subprocess, read_json
from test_hardening_signals import ARGS, _env

SWEEP = [*ARGS[:-2], "trainer.epochs=1", "trainer.progress=false", "trainer.checkpoint_every_steps=5", "seed=0,1,2"]
# 20 steps an epoch: job 000 saves last.pt 5 times (2 atomic writes each: checksum, file); the 7th save is job 001's
KILLED_IN_JOB_001 = "last.pt:14"


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep of 3 jobs SIGKILLed during job 001: 000 completed, 001 running with checkpoints, 002 pending."""
    tmp = tmp_path_factory.mktemp("sweep")
    r = cli_subprocess("sweep", "train", *SWEEP, cwd=tmp, env=_env(tmp, KILL_IN_WRITE=KILLED_IN_JOB_001))
    assert r.returncode == -9, r.stderr
    sweep = next((tmp / "runs" / "sweeps").iterdir())
    assert [j["state"] for j in read_json(sweep / "sweep.json")["jobs"]] == ["completed", "running", "pending"]
    assert (sweep / "001" / "checkpoints" / "last.prev.pt").is_file()
    return sweep


def _damage(job: Path, kind: str) -> str:
    """Break job 001 in one way; return what its recorded reason must name."""
    if kind == "unknown-model":
        config = job / "config.yaml"
        config.write_text(config.read_text().replace("name: sig_cnn", "name: nosuch_cnn"))
        return "nosuch_cnn"
    if kind == "corrupt-checkpoints":
        for name in ("last.pt", "last.prev.pt"):
            (job / "checkpoints" / name).write_bytes(b"junk")
        return "no usable checkpoint"
    (job / "status.json").write_text("{garbage")
    return "status.json"


@pytest.mark.parametrize("kind", ["unknown-model", "corrupt-checkpoints", "garbage-status"])
def test_resume_of_a_sweep_records_a_bad_job_as_failed_and_goes_on(
    killed_sweep: Path, tmp_path: Path, kind: str
) -> None:
    """#15.10: job 001 cannot be resumed: it is failed with its reason, job 002 still runs, the sweep ends failed."""
    shutil.copytree(killed_sweep.parent.parent.parent, tmp_path, dirs_exist_ok=True)
    sweep = tmp_path / killed_sweep.relative_to(killed_sweep.parent.parent.parent)
    reason = _damage(sweep / "001", kind)
    r = cli_subprocess("resume", str(sweep), "+imports=[sigplugin]", cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "failed" and [j["state"] for j in record["jobs"]] == ["completed", "failed", "completed"]
    bad = record["jobs"][1]
    assert bad["exit_code"] == 2 and reason in bad["error"] and bad["objective"] is None, bad
    status = read_json(sweep / "001" / "status.json")
    assert status["state"] == "failed" and reason in status["error"], status
    assert "job 001: error: " in r.stderr and reason in r.stderr
    assert read_json(sweep / "002" / "status.json")["state"] == "completed"


def test_sweep_with_a_config_dir_resumes_with_it(tmp_path: Path) -> None:
    """#15.11: the sweep records its --config-dir (absolute); resume composes the jobs not yet started from it."""
    tree = tmp_path / "myconf" / "model"
    tree.mkdir(parents=True)
    (tree / "narrow.yaml").write_text(
        "name: sig_cnn\nin_channels: ${data.channels}\nnum_classes: ${data.num_classes}\nwidth: 6\ndropout: 0.0\n"
    )
    args = ["--config-dir", "myconf", *[a for a in SWEEP if not a.startswith("model.")], "model=narrow"]
    r = cli_subprocess("sweep", "train", *args, cwd=tmp_path, env=_env(tmp_path, KILL_IN_WRITE=KILLED_IN_JOB_001))
    assert r.returncode == -9, r.stderr
    sweep = next((tmp_path / "runs" / "sweeps").iterdir())
    record = read_json(sweep / "sweep.json")
    assert record["config_dir"] == str((tmp_path / "myconf").resolve())
    elsewhere = tmp_path / "elsewhere"  # resumed from another working directory: the path still holds
    elsewhere.mkdir()
    done = cli_subprocess("resume", str(sweep), "+imports=[sigplugin]", cwd=elsewhere, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "completed" and [j["state"] for j in record["jobs"]] == ["completed"] * 3
    for job in ("000", "002"):
        assert "width: 6" in (sweep / job / "config.yaml").read_text()
