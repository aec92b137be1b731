"""Issue #15, records and placement: Hydra's file-placing keys stay inside the run folder, a run folder is input
(validated, never importing what it names), damaged records and weights are one line, writes leave nothing
half-written. Every test drives the real CLI; each case failed (traceback, a file outside, a module imported) before."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import FAST, cli, only_run, read_json
from test_bad_input import _fake_run


def _one_error(r, fragment: str = "", code: int = 2) -> str:
    """The command failed with `code` and exactly one `modrun: error:` line (containing `fragment`)."""
    assert r.code == code, r.text
    assert "Traceback" not in r.text
    lines = [line for line in r.err.strip().splitlines() if not line.startswith("modrun: warning:")]
    assert len(lines) == 1 and lines[0].startswith("modrun: error: "), lines
    assert fragment in lines[0], lines[0]
    return lines[0]


def _no_runs() -> bool:
    return not Path("runs").exists() or not any(Path("runs").rglob("*"))


# --- 1: hydra.* keys that place files -----------------------------------------------------------------------

PLACEMENT = [
    ("hydra.output_subdir={out}/elsewhere", "hydra.output_subdir"),
    ("hydra.output_subdir=../../../x", "hydra.output_subdir"),
    ("hydra.output_subdir=.", "hydra.output_subdir"),
    ("hydra.run.dir={out}/x", "hydra.run.dir"),
    ("hydra.sweep.dir={out}/x", "hydra.sweep.dir"),
    ("hydra.sweep.subdir=../x", "hydra.sweep.subdir"),
    ("+hydra.job_logging.handlers.f.filename={out}/x.log", "hydra.job_logging.handlers.f.filename"),
    ("hydra/job_logging=default hydra.job_logging.handlers.file.filename={out}/x.log", "handlers.file.filename"),
    ("+hydra.job_logging.handlers.f.class=os.system", "hydra.job_logging.handlers.f.class"),
    ("+hydra.hydra_logging.handlers.f.()=os.system", "hydra.hydra_logging.handlers.f.()"),
]


@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize(("override", "key"), PLACEMENT, ids=[p[1] + ":" + p[0][-12:] for p in PLACEMENT])
def test_hydra_keys_that_place_files_outside_are_refused(tmp_path, command, override, key):
    out = tmp_path / "outside"
    args = [o.replace("{out}", str(out)) for o in override.split()]
    r = cli(*(["validate", "train"] if command == "validate" else ["train"]), *FAST, "runs_dir=runs/deep", *args)
    _one_error(r, key)
    assert not out.exists() and not (tmp_path / "x").exists() and _no_runs()


def test_hydra_log_file_inside_the_run_folder_is_fine():
    r = cli("train", *FAST, "hydra/job_logging=default", "hydra.output_subdir=meta/hydra")
    assert r.code == 0, r.text
    run = only_run()
    assert (run / "train.log").is_file() and (run / "meta" / "hydra" / "config.yaml").is_file()


def test_reproduce_refuses_a_tampered_overrides_txt(tmp_path):
    run = Path(_fake_run(tmp_path / "runs" / "train" / "r", ["model.width=8", "trainer.epochs=0"]))
    (run / "overrides.txt").write_text(f"model.width=8\nhydra.output_subdir={tmp_path / 'x'}\n")
    before = sorted(p.name for p in run.parent.iterdir())
    _one_error(cli("reproduce", str(run)), "hydra.output_subdir")
    assert not (tmp_path / "x").exists() and sorted(p.name for p in run.parent.iterdir()) == before


# --- 2: paths read from sweep.json ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_dir", ["../../../x", "/tmp/modrun-outside-{u}", "000/../..", ""])
def test_sweep_job_folders_outside_the_sweep_are_refused(tmp_path, run_dir):
    run_dir = run_dir.replace("{u}", uuid.uuid4().hex)
    sweep = tmp_path / "runs" / "sweeps" / "s"
    sweep.mkdir(parents=True)
    record = {"command": "train", "objective": "val/top1", "direction": "maximize", "state": "interrupted"}
    job = {"num": 0, "run_dir": run_dir, "overrides": ["trainer.epochs=0"], "state": "pending"}
    (sweep / "sweep.json").write_text(json.dumps({**record, "jobs": [job]}))
    _one_error(cli("resume", str(sweep)), "sweep.json")
    assert not (tmp_path / "x").exists() and not (Path(run_dir).is_absolute() and Path(run_dir).exists())
    assert read_json(sweep / "sweep.json")["state"] == "interrupted"  # no state changed
    r = cli("runs", "compare", str(sweep), "--no-plots")  # listed as a bad job, not followed
    assert r.code == 0 and "Traceback" not in r.text and "sweep.json" in r.err, r.text
    _one_error(cli("soup", str(sweep)), "sweep.json")


# --- 3: a run folder's config.yaml is input --------------------------------------------------------------------


@pytest.fixture
def interrupted(tmp_path: Path) -> Path:
    run = Path(_fake_run(tmp_path / "runs" / "train" / "r", ["model.width=8", "trainer.epochs=0"], "interrupted"))
    return run


def _evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module that leaves a marker file when imported, importable from the test's folder."""
    name, marker = f"evil_{uuid.uuid4().hex[:8]}", tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


@pytest.mark.parametrize("command", ["resume", "reproduce", "eval"])
def test_modules_named_by_a_run_folder_are_not_imported(interrupted, tmp_path, monkeypatch, command):
    name, marker = _evil_module(tmp_path, monkeypatch)
    cfg = interrupted / "config.yaml"
    cfg.write_text(cfg.read_text() + f"imports:\n- {name}\n")
    status = (interrupted / "status.json").read_bytes()
    _one_error(cli(command, str(interrupted)), f"+imports=[{name}]")
    assert not marker.exists() and (interrupted / "status.json").read_bytes() == status
    assert sorted(p.name for p in interrupted.parent.iterdir()) == ["r"]
    if command == "eval":  # named by the user: imported, and the run evaluates
        r = cli("eval", str(interrupted), f"+imports=[{name}]")
        assert r.code == 0 and marker.exists(), r.text


def test_soup_imports_only_what_the_user_names(tmp_path, monkeypatch):
    name, marker = _evil_module(tmp_path, monkeypatch)
    runs = [_fake_run(tmp_path / f"r{i}", ["model.width=8"]) for i in range(2)]
    cfg = Path(runs[0]) / "config.yaml"
    cfg.write_text(cfg.read_text() + f"imports:\n- {name}\n")
    _one_error(cli("soup", *runs), f"+imports=[{name}]")
    assert not marker.exists() and _no_runs()


BAD_CONFIGS = {  # case: (config.yaml from the good one, a fragment of the one error line)
    "imports_number": (lambda t: t + "imports: 5\n", "imports=5: expects a list of module names"),
    "imports_empty_name": (lambda t: t + "imports: ['']\n", "imports=['']"),
    "empty": (lambda t: "", "config.yaml: empty"),
    "target_top": (lambda t: t + "_target_: os.system\n", "_target_: modrun builds components by registered name"),
    "target_nested": (lambda t: t + "extra:\n  _target_: os.system\n", "extra._target_"),
    "not_mapping": (lambda t: "- 1\n- 2\n", "does not hold a mapping"),
    "unknown_model": (lambda t: t.replace("name: cnn_small", "name: nope", 1), "unknown model"),
    "wrong_type": (lambda t: t.replace("\nseed: 0", "\nseed: abc", 1), "seed"),
    "broken_yaml": (lambda t: t + "model: [unbalanced\n", "cannot read config.yaml"),
}


@pytest.mark.parametrize("command", ["resume", "reproduce", "eval"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_yaml_is_bad_input_and_changes_nothing(interrupted, command, case):
    change, fragment = BAD_CONFIGS[case]
    cfg = interrupted / "config.yaml"
    cfg.write_text(change(cfg.read_text()))
    status = (interrupted / "status.json").read_bytes()
    _one_error(cli(command, str(interrupted)), fragment)
    assert (interrupted / "status.json").read_bytes() == status  # still interrupted, not failed
    assert sorted(p.name for p in interrupted.parent.iterdir()) == ["r"]


# --- 4: runs_dir ------------------------------------------------------------------------------------------------


def test_runs_dir_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = cli("train", *FAST, "runs_dir='~/myruns'")
    assert r.code == 0, r.text
    assert not (tmp_path / "~").exists()
    assert len(list((tmp_path / "home" / "myruns" / "train").iterdir())) == 1


@pytest.mark.parametrize("value", ["null", "5", "''"])
def test_runs_dir_that_is_no_path_is_bad_input(value):
    _one_error(cli("train", *FAST, f"runs_dir={value}"), "runs_dir")


# --- 14: weights that are not safetensors -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "pickled", "empty"])
def test_damaged_model_safetensors_is_one_line(tmp_path, damage):
    import torch

    runs = [Path(_fake_run(tmp_path / f"r{i}", ["model.width=8"])) for i in range(2)]
    weights = runs[0] / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "pickled":
        torch.save({"w": torch.zeros(2)}, weights)
    else:
        weights.write_bytes(b"")
    _one_error(cli("eval", str(runs[0])), str(weights))
    _one_error(cli("soup", *map(str, runs)), str(weights))
    assert _no_runs()


# --- 15: errors inside Hydra, and module names that are none ------------------------------------------------------


def test_hydra_failures_after_compose_leave_no_folder(tmp_path):
    (tmp_path / "cd" / "model").mkdir(parents=True)
    (tmp_path / "cd" / "model" / "broken.yaml").write_text("name: cnn_small\nwidth: [8\n")
    (tmp_path / "cd" / "hydra" / "job_logging").mkdir(parents=True)
    (tmp_path / "cd" / "hydra" / "job_logging" / "mine.yaml").write_text(
        "version: 1\nhandlers:\n  h:\n    class: logging.NoSuchHandler\nroot:\n  handlers: [h]\n"
    )
    _one_error(cli("train", *FAST, "hydra.mode=MULTIRUN"), "hydra.mode")
    _one_error(cli("validate", "train", "--config-dir", "cd", "model=broken"), "broken.yaml:")
    _one_error(cli("train", *FAST, "--config-dir", "cd", "model=broken"), "broken.yaml:")
    _one_error(cli("train", *FAST, "--config-dir", "cd", "hydra/job_logging=mine"), "Hydra could not start the job")
    for bad in ("''", ".foo", "'a..b'"):
        _one_error(cli("train", *FAST, f"+imports=[{bad}]"), "is not a module name")
    assert _no_runs()


# --- 17: writes ---------------------------------------------------------------------------------------------------


def _failing(err: int):
    def fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    return fsync


@pytest.mark.parametrize(("err", "code"), [(errno.ENOSPC, 1), (errno.EROFS, 2)])
def test_eval_that_cannot_write_leaves_evals_jsonl_as_it_was(tmp_path, monkeypatch, err, code):
    run = Path(_fake_run(tmp_path / "r", ["model.width=8"]))
    assert cli("eval", str(run)).code == 0
    before = (run / "evals.jsonl").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _failing(err))
        _one_error(cli("eval", str(run)), "evals.jsonl", code)
    assert (run / "evals.jsonl").read_bytes() == before and not list(run.glob(".evals.jsonl.*"))
    (run / "evals.jsonl").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _failing(err))
        _one_error(cli("eval", str(run)), "evals.jsonl", code)
    assert not (run / "evals.jsonl").exists()


def test_resume_of_a_folder_it_cannot_write_is_one_line(interrupted, monkeypatch):
    status = (interrupted / "status.json").read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", refuse)
        _one_error(cli("resume", str(interrupted)), "cannot write into")
    assert (interrupted / "status.json").read_bytes() == status


def test_compare_out_that_is_a_file_and_a_name_too_long(tmp_path):
    run = _fake_run(tmp_path / "r", ["model.width=8"])
    (tmp_path / "afile").write_text("x")
    _one_error(cli("runs", "compare", run, "--out", str(tmp_path / "afile"), "--no-plots"), "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"
    _one_error(cli("train", *FAST, "name=" + "n" * 5000), "name: 5000 characters")
    assert _no_runs()


def test_a_record_of_another_choice_still_needs_the_keys_its_choice_needs(tmp_path):
    """A language-model run's config.yaml without data.batch_size: refused on resume naming the key (the record
    is checked against the tree composed with its own choices, data=python_docs and model=gpt)."""
    lm = ["model=gpt", "data=python_docs", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "trainer.epochs=0"]
    assert cli("train", *lm, "trainer.progress=false").code == 0
    run = only_run()
    (run / "status.json").write_text(json.dumps({**read_json(run / "status.json"), "state": "interrupted"}))
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join(x for x in text.splitlines() if not x.startswith("  batch_size:")))
    before = (run / "status.json").read_bytes()
    _one_error(cli("resume", str(run)), "data.batch_size")
    assert (run / "status.json").read_bytes() == before
