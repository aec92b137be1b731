"""`modrun reproduce RUN_DIR` through the real CLI: a new folder from the run's own record, warnings for what
changed, and a metric-by-metric comparison (bitwise identical on CPU in the same environment)."""

import json
from pathlib import Path

from conftest import FAST, cli, only_run, read_json


def _repro(command: str = "train", runs: Path = Path("runs")) -> Path:
    found = [p for p in (runs / command).iterdir() if p.name.endswith("_repro")]
    assert len(found) == 1, found
    return found[0]


def test_reproduce_train_is_bitwise_identical_then_reports_what_changed():
    assert cli("train", *FAST, "seed=3").code == 0
    run = only_run()
    r = cli("reproduce", str(run))
    assert r.code == 0, r.text
    assert "warning" not in r.err and "as recorded" in r.out
    assert "bitwise identical" in r.out and "differs" not in r.out
    repro = _repro()
    assert repro.parent == run.parent and (repro / ".hydra" / "overrides.yaml").is_file()
    assert (repro / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    record = read_json(repro / "reproduces.json")
    assert record["original"] == str(run.resolve()) and record["comparison"]["identical"] is True
    assert all(m["identical"] for m in record["comparison"]["metrics"]) and len(record["comparison"]["metrics"]) >= 10
    assert read_json(repro / "summary.json")["final"] == read_json(run / "summary.json")["final"]
    assert read_json(repro / "status.json")["state"] == "completed"
    assert (repro / "overrides.txt").read_text() == (run / "overrides.txt").read_text()

    # a changed environment, git state and result: one warning line each, still exit 0; the table says so
    env = read_json(run / "env.json")
    env["torch"], env["packages"]["not-a-real-package"] = "0.0.1", "1.0"
    (run / "env.json").write_text(json.dumps(env))
    (run / "git.json").write_text(json.dumps({"commit": "0123456789abcdef", "dirty": True}))
    summary = read_json(run / "summary.json")
    summary["final"]["test/top1"] += 1.0
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "overrides.txt").write_text("trainer.epochs=1\nmodel.width=24\n")  # today's tree: another config
    for old in (Path("runs") / "train").glob("*_repro"):
        old.rename(old.with_name(old.name.replace("_repro", "_first")))
    r = cli("reproduce", str(run))
    assert r.code == 0, r.text
    warnings = [line for line in r.err.splitlines() if line.startswith("modrun: warning:")]
    assert any("torch: 0.0.1 recorded" in w for w in warnings)
    assert any("package not-a-real-package: 1.0 recorded, absent now" in w for w in warnings)
    assert any("git: the run was at commit 0123456789ab" in w for w in warnings)
    assert any("config: model.width composes to 24 now, 16 recorded" in w for w in warnings)
    assert "1 of" in r.out and "metrics differ" in r.out and "differs" in r.out
    record = read_json(_repro() / "reproduces.json")
    assert record["comparison"]["identical"] is False and record["comparison"]["weights"]["identical"] is True
    top1 = next(m for m in record["comparison"]["metrics"] if m["metric"] == "final/test/top1")
    assert top1["abs_diff"] == 1.0 and not top1["identical"]
    assert len(record["differences"]) == len(warnings)


def test_reproduce_distill_reuses_the_teacher_trained_on_the_fly():
    assert cli("distill", *FAST, "teacher.epochs=1").code == 0
    teachers = list((Path("runs") / "train").iterdir())
    assert len(teachers) == 1
    r = cli("reproduce", str(only_run("distill")))
    assert r.code == 0, r.text
    assert "bitwise identical" in r.out and "teacher weights" in r.out
    assert list((Path("runs") / "train").iterdir()) == teachers  # reused, not trained again
    assert read_json(_repro("distill") / "reproduces.json")["comparison"]["teachers_identical"] is True


def test_reproduce_prune_is_identical():
    assert cli("prune", *FAST, "source.epochs=1", "prune.sparsity=0.5").code == 0
    r = cli("reproduce", str(only_run("prune")))
    assert r.code == 0, r.text
    assert read_json(_repro("prune") / "reproduces.json")["comparison"]["identical"] is True


def test_reproduce_bad_input_failed_and_interrupted_runs(tmp_path):
    r = cli("reproduce", str(tmp_path))
    assert r.code == 2 and "not a modrun run folder" in r.err and len(r.err.strip().splitlines()) == 1
    assert cli("reproduce", "nowhere").code == 2

    # a run that failed (NaN) fails again: exit 1, the reproduction's record says so
    assert cli("train", *FAST, "optim.lr=1e6", "name=diverged").code == 1
    failed = only_run()
    r = cli("reproduce", str(failed))
    assert r.code == 1
    assert f"{failed} is failed, not completed; reproducing it anyway" in r.err
    record = read_json(_repro() / "reproduces.json")
    assert record["exit_code"] == 1 and "comparison" not in record
    assert read_json(_repro() / "status.json")["state"] == "failed"

    # an interrupted run (no summary) is reproduced, with a warning and nothing to compare
    assert cli("train", *FAST, "--runs-dir", "other").code == 0
    run = only_run(runs_dir=Path("other"))
    (run / "summary.json").unlink()
    (run / "status.json").write_text(json.dumps({**read_json(run / "status.json"), "state": "interrupted"}))
    r = cli("reproduce", str(run))
    assert r.code == 0, r.text
    assert "is interrupted, not completed" in r.err and "nothing to compare" in r.out
    assert read_json(_repro(runs=Path("other")) / "reproduces.json")["comparison"] is None
