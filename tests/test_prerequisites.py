"""Runs a run needs first (teacher, prune source), through the real CLI: found by meaning, trained once with
their own settings, shared by parallel jobs, never resumed while they may be running, recorded."""

import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import FAST, cli, read_json
from omegaconf import OmegaConf

# student cnn_small width 8 for one epoch; teacher cnn_small width 16 for its own single epoch
QUICK = [*FAST[:1], *FAST[2:], "teacher.width=16", "teacher.epochs=1"]


def _runs(command: str, runs_dir: Path = Path("runs")) -> list[Path]:
    return sorted((runs_dir / command).iterdir()) if (runs_dir / command).exists() else []


def only_sweep() -> Path:
    (sweep,) = (Path("runs") / "sweeps").iterdir()
    return sweep


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def _config(run: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))


def test_parallel_sweep_jobs_share_one_teacher_trained_first():
    """Bug 1: with joblib and two jobs, both complete and one teacher run exists."""
    args = ["sweep", "distill", *QUICK, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    r = cli(*args)
    assert r.code == 0, r.text
    assert len(_runs("train")) == 1
    teacher = _runs("train")[0]
    sweep = only_sweep()
    assert [j["state"] for j in read_json(sweep / "sweep.json")["jobs"]] == ["completed", "completed"]
    records = [read_json(sweep / job / "prerequisites.json")[0] for job in ("000", "001")]
    assert {r["run"] for r in records} == {str(teacher)}
    assert sorted(r["how"] for r in records) == ["reused", "trained"]


def test_teacher_has_its_own_epochs_and_a_student_epoch_sweep_reuses_it():
    """Bug 2: the student's trainer.epochs never reaches the teacher."""
    r = cli("distill", *QUICK[1:], "trainer.epochs=1", "teacher.epochs=2")
    assert r.code == 0, r.text
    teacher = _runs("train")[0]
    assert _config(teacher)["trainer"]["epochs"] == 2
    assert _config(teacher)["optim"]["lr"] != 0.2  # nor the student's optimiser: modrun train's own defaults
    r = cli("distill", *QUICK[1:], "trainer.epochs=2", "teacher.epochs=2")
    assert r.code == 0 and f"teacher: reusing {teacher}" in r.err
    assert len(_runs("train")) == 1
    r = cli("distill", *QUICK, "teacher.overrides=['optim.lr=0.1']")
    assert r.code == 0 and len(_runs("train")) == 2
    assert _config(_runs("train")[-1])["optim"]["lr"] == 0.1


def test_users_own_train_run_is_reused_as_teacher_and_as_prune_source():
    """Bug 3 and 5: the key is the run's meaning, not its name, logger, progress or process count."""
    own = ["model.width=16", "data.batch_size=32", "trainer.epochs=1", "trainer.progress=false"]
    r = cli("train", *own, "name=mine", "trainer.log_every_steps=7", "trainer.checkpoint_every_steps=9")
    assert r.code == 0, r.text
    mine = _runs("train")[0]
    r = cli("distill", *QUICK)
    assert r.code == 0 and f"teacher: reusing {mine}" in r.err, r.text
    r = cli("prune", "source.epochs=1", *FAST[:2], "data.batch_size=32", "trainer.progress=false")
    assert r.code == 0 and f"source: reusing {mine}" in r.err, r.text
    assert len(_runs("train")) == 1
    record = read_json(_runs("prune")[0] / "prerequisites.json")
    assert [(p["role"], p["key"], p["run"], p["how"]) for p in record] == [
        ("source", "source.run", str(mine), "reused")
    ]
    assert record[0]["sha256"] == hashlib.sha256((mine / "model.safetensors").read_bytes()).hexdigest()
    shown = cli("runs", "show", str(_runs("prune")[0]))
    assert shown.code == 0 and "source" in shown.out and str(mine) in shown.out


def test_a_teacher_run_that_may_be_running_is_not_resumed_a_dead_one_is():
    """Bug 4: `created`, or `running` on another host or with a live pid, is an error; a dead pid here resumes."""
    assert cli("distill", *QUICK).code == 0
    teacher = _runs("train")[0]
    status = read_json(teacher / "status.json")
    for state, host, message in [
        ("created", socket.gethostname(), "state created"),
        ("running", "another-host", "on another-host"),
    ]:
        write_json(teacher / "status.json", {**status, "state": state, "host": host})
        r = cli("distill", *QUICK)
        assert r.code == 2 and f"the teacher run {teacher} is being made" in r.err and message in r.err, r.text
        assert "Traceback" not in r.text and len(_runs("train")) == 1
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_json(teacher / "status.json", {**status, "state": "running", "host": socket.gethostname(), "pid": dead.pid})
    r = cli("distill", *QUICK)
    assert r.code == 0 and f"resuming the unfinished teacher run {teacher}" in r.err, r.text
    assert read_json(teacher / "status.json")["state"] == "completed" and len(_runs("train")) == 1


def test_m2m_on_the_default_pair_bridges_stages_with_adapters():
    """Bug 6: cnn_tiny's stages are narrower than cnn_small's; adapters bridge them in phase 1."""
    r = cli("distill", "kd=m2m", "kd.m2m.epochs=1", *QUICK[:1], *QUICK[2:4], "teacher.epochs=1")
    assert r.code == 0, r.text
    assert re.search(r"m2m phase 1, stage 1: student features\.\S+ inside the teacher .*\(adapters: 32x\d+x\d+ ", r.err)
    summary = read_json(_runs("distill")[0] / "summary.json")
    assert set(summary["m2m_phase1"]) >= {"m2m_stage0", "m2m_stage1"}


def test_the_console_ends_with_the_result():
    """The last line names the final and best metrics and the run folder."""
    r = cli("train", *FAST)
    assert r.code == 0
    run = _runs("train")[0]
    last = [line for line in r.text.splitlines() if line.strip()][-1]
    final = read_json(run / "summary.json")["final"]
    assert f"val/top1 {final['val/top1']:.4g}" in last and "best (epoch 1)" in last and str(run) in last
