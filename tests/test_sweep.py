"""`modrun sweep` through the real CLI: Hydra's grammar, launchers and sweepers, the sweep folder, failing
jobs, resume of a killed sweep, validation before any job, and `modrun runs compare`."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, cli, cli_subprocess, read_json
from test_resume import ARGS, PLUGIN, _env, _start

from modrun.core.plots import pareto_front


def only_sweep(runs: Path = Path("runs")) -> Path:
    sweeps = sorted((runs / "sweeps").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def summary_rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_grid_sweep_writes_one_run_folder_per_job_and_a_summary():
    r = cli("sweep", "train", *FAST, "seed=range(0,2)", "model=glob(cnn_*)")
    assert r.code == 0, r.text
    sweep = only_sweep()
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "completed" and record["command"] == "train" and record["sweeper"] == "BasicSweeper"
    jobs = record["jobs"]
    assert [j["run_dir"] for j in jobs] == ["000", "001", "002", "003"]
    combos = {
        (o["seed"], o["model"]) for o in ({x.split("=")[0]: x.split("=")[1] for x in j["overrides"]} for j in jobs)
    }
    assert combos == {("0", "cnn_small"), ("0", "cnn_tiny"), ("1", "cnn_small"), ("1", "cnn_tiny")}
    for job in jobs:
        run = sweep / job["run_dir"]
        for name in ("config.yaml", "overrides.txt", "command.txt", "env.json", "log.txt", "metrics.jsonl"):
            assert (run / name).is_file(), name
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "model.safetensors").is_file()
        assert read_json(run / "status.json")["state"] == "completed" == job["state"]
        assert job["objective"] == read_json(run / "summary.json")["final"]["val/top1"]
    rows = summary_rows(sweep)
    assert [r["state"] for r in rows] == ["completed"] * 4 and float(rows[2]["val/top1"]) == jobs[2]["objective"]
    # a job's command.txt re-runs it alone, to the same weights
    line = (sweep / "002" / "command.txt").read_text().split()
    assert line[:2] == ["modrun", "train"]
    assert cli(*line[1:], "runs_dir=single").code == 0
    single = next((Path("single") / "train").iterdir())
    assert (single / "model.safetensors").read_bytes() == (sweep / "002" / "model.safetensors").read_bytes()
    # sweep jobs are listed with the other runs
    listed = cli("runs", "list", "runs")
    assert listed.code == 0 and listed.text.count("completed") == 4


def test_failing_job_is_recorded_and_the_others_run():
    r = cli("sweep", "train", *FAST, "optim.lr=1e6,0.2")
    assert r.code == 1
    sweep = only_sweep()
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "failed"
    assert [j["state"] for j in record["jobs"]] == ["failed", "completed"]
    assert record["jobs"][0]["exit_code"] == 1 and record["jobs"][0]["objective"] is None
    assert "non-finite" in read_json(sweep / "000" / "status.json")["error"]
    assert "did not complete" in r.text and "modrun resume" in r.text


def test_joblib_launcher_runs_jobs_in_parallel_processes_with_the_same_results():
    assert cli("sweep", "train", *FAST, "optim.lr=0.1,0.2", "runs_dir=basic").code == 0
    r = cli("sweep", "train", *FAST, "optim.lr=0.1,0.2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert r.code == 0, r.text
    joblib_sweep, basic_sweep = only_sweep(), only_sweep(Path("basic"))
    assert read_json(joblib_sweep / "sweep.json")["launcher"] == "JoblibLauncher"
    pids = {read_json(joblib_sweep / j / "status.json")["pid"] for j in ("000", "001")}
    assert len(pids) == 2  # two worker processes
    # the same runs: equal up to float summation order (joblib's workers use one thread each)
    for job in ("000", "001"):
        a, b = (read_json(s / job / "summary.json")["final"] for s in (joblib_sweep, basic_sweep))
        assert a["val/top1"] == b["val/top1"] and a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)


def test_optuna_sweeper_optimises_the_sweep_objective():
    r = cli(
        "sweep",
        "train",
        *[a for a in FAST if not a.startswith("optim.lr=")],
        "optim.lr=interval(0.05,0.3)",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",
        "sweep.objective=test/top1",
    )
    assert r.code == 0, r.text
    sweep = only_sweep()
    record = read_json(sweep / "sweep.json")
    assert record["sweeper"] == "OptunaSweeper" and len(record["jobs"]) == 3
    values = [j["objective"] for j in record["jobs"]]
    assert values == [read_json(sweep / j["run_dir"] / "summary.json")["final"]["test/top1"] for j in record["jobs"]]
    rates = {o for j in record["jobs"] for o in j["overrides"] if o.startswith("optim.lr=")}
    assert len(rates) == 3 and all(0.05 <= float(r.split("=")[1]) <= 0.3 for r in rates)
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {max(values)}" in results


def test_submitit_local_launcher():
    r = cli("sweep", "train", *FAST, "seed=0,1", "hydra/launcher=submitit_local")
    assert r.code == 0, r.text
    sweep = only_sweep()
    assert read_json(sweep / "sweep.json")["launcher"] == "LocalLauncher"
    assert [j["state"] for j in read_json(sweep / "sweep.json")["jobs"]] == ["completed", "completed"]
    assert (sweep / ".submitit").is_dir()


def test_slurm_launcher_config_is_shipped():
    from modrun.runner.compose import Composer

    with Composer("train") as composer:
        launcher = composer.compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], True, True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.tasks_per_node == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lrr=0.1,0.2"], "unknown key optim.lrr — did you mean optim.lr?"),
        (["model=resnet20,cnnsmall"], "model=cnnsmall: no such model config — did you mean cnn_small?"),
        (["trainer.epochs=1,abc"], "trainer.epochs=abc"),
        (["seed=1"], "a sweep needs at least one swept key"),
        (["seed=0,1", "hydra/launcher=jobllib"], "jobllib"),
    ],
)
def test_bad_sweeps_fail_before_any_job(args, message):
    r = cli("sweep", "train", *args)
    assert r.code == 2 and message in r.text, r.text
    assert "Traceback" not in r.text and not Path("runs").exists()


def test_missing_plugin_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "optuna" in name else real(name, *a))
    r = cli("sweep", "train", "optim.lr=interval(0.1,0.2)", "hydra/sweeper=optuna")
    assert r.code == 2 and "pip install 'modrun[sweep]'" in r.text


def test_killed_sweep_resumes_only_the_jobs_that_did_not_complete(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    args = [a for a in ARGS if not a.startswith(("seed=", "trainer.epochs="))] + ["trainer.epochs=2", "seed=0,1,2"]
    proc = _start(tmp_path, "runs", 0.02, "sweep", "train", *args)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/sweeps/*/001/checkpoints/last.pt")):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sweep = only_sweep(tmp_path / "runs")
    states = [j["state"] for j in read_json(sweep / "sweep.json")["jobs"]]
    assert states == ["completed", "running", "pending"] and not (sweep / "002").exists()
    first = (sweep / "000" / "summary.json").stat().st_mtime_ns

    done = cli_subprocess("resume", str(sweep), "+imports=[slowplugin]", cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    record = read_json(sweep / "sweep.json")
    assert record["state"] == "completed" and [j["state"] for j in record["jobs"]] == ["completed"] * 3
    assert (sweep / "000" / "summary.json").stat().st_mtime_ns == first  # the finished job was left alone
    assert "resumed from step" in (sweep / "001" / "log.txt").read_text()
    # the resumed job ends where an uninterrupted run of the same overrides ends
    overrides = record["jobs"][1]["overrides"]
    ref = cli_subprocess("train", "runs_dir=ref", *overrides, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    reference = next((tmp_path / "ref" / "train").iterdir())
    assert (reference / "model.safetensors").read_bytes() == (sweep / "001" / "model.safetensors").read_bytes()
    again = cli_subprocess("resume", str(sweep), "+imports=[slowplugin]", cwd=tmp_path)
    assert again.returncode == 0 and "every job already completed" in again.stderr


def test_two_sweeps_started_together_get_their_own_folders(tmp_path):
    cmd = [sys.executable, "-m", "modrun.cli", "sweep", "train", *FAST, "seed=0,1"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    sweeps = sorted((tmp_path / "runs" / "sweeps").iterdir())
    assert len(sweeps) == 2
    for sweep in sweeps:
        assert [j["state"] for j in read_json(sweep / "sweep.json")["jobs"]] == ["completed", "completed"]


def test_compare_ranks_runs_with_seed_means_csv_and_plots():
    assert cli("sweep", "train", *FAST, "optim.lr=0.05,0.2", "seed=0,1").code == 0
    sweep = only_sweep()
    r = cli("runs", "compare", str(sweep))
    assert r.code == 0, r.text
    assert "ranked by val/top1" in r.text and "mean ± std over seeds" in r.text
    with open(sweep / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    scores = [float(row["val/top1"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) == 4
    assert (sweep / "curves.png").stat().st_size > 1000 and (sweep / "pareto.png").stat().st_size > 1000
    # separate run folders work too, ranked by another metric, written elsewhere
    runs = [str(sweep / j) for j in ("000", "003")]
    r = cli("runs", "compare", *runs, "--objective", "test/top1", "--out", "cmp", "--no-plots")
    assert r.code == 0 and "ranked by test/top1" in r.text and (Path("cmp") / "compare.csv").is_file()
    bad = cli("runs", "compare", "nowhere")
    assert bad.code == 2 and "neither a sweep folder" in bad.text


def test_pareto_front():
    points = [(10, 90.0), (5, 80.0), (20, 95.0), (15, 85.0), (5, 70.0), (30, 94.0)]
    assert pareto_front(points) == [(5, 80.0), (10, 90.0), (20, 95.0)]
    assert pareto_front([(1, 0.5), (2, 0.2), (3, 0.3)], maximize=False) == [(1, 0.5), (2, 0.2)]


def test_sweep_help_lists_the_grammar():
    r = cli_subprocess("sweep", "--help")
    assert r.returncode == 0 and "multirun" in r.stdout


def test_an_interruption_between_a_job_end_and_its_record_keeps_the_job_completed():
    """A signal can land after a job's folder says completed but before sweep.json does: the job stays done."""
    from modrun.core.runfolder import write_json
    from modrun.runner.sweep import interrupted

    assert cli("sweep", "train", *FAST, "seed=0,1").code == 0
    sweep = only_sweep()
    record = read_json(sweep / "sweep.json")
    expected = record["jobs"][0]["objective"]
    record["jobs"][0].update(state="running", objective=None)  # as if the signal came before record_end
    record["jobs"][1].update(state="running", objective=None)
    write_json(sweep / "001" / "status.json", {**read_json(sweep / "001" / "status.json"), "state": "running"})
    write_json(sweep / "sweep.json", record)
    assert interrupted(sweep, "val/top1") == 130
    after = read_json(sweep / "sweep.json")
    assert after["state"] == "interrupted"
    assert after["jobs"][0]["state"] == "completed" and after["jobs"][0]["objective"] == expected
    assert after["jobs"][1]["state"] == "running"  # its folder says it had not ended: resume reruns it
