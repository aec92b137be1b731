"""Experiment loggers (logger=tensorboard, logger=mlflow): the same numbers as metrics.jsonl, one series per
metric across resumes, and a one-line error when the optional package is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, cli, only_run, read_json, read_metrics
from omegaconf import OmegaConf

from modrun.components.loggers import TensorBoardLogger, metric_items
from modrun.core.runfolder import MetricsWriter


def _val_top1(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["top1"]) for r in read_metrics(run) if r["split"] == "val"]


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()  # also applies the purge a resumed session asked for
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow_client(run: Path):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    return MlflowClient((run / "mlruns").resolve().as_uri())


def _mlflow_history(run: Path, key: str) -> list[tuple[int, float]]:
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    return sorted((m.step, m.value) for m in _mlflow_client(run).get_metric_history(run_id, key))


def test_tensorboard_has_the_metrics_of_metrics_jsonl():
    pytest.importorskip("tensorboard")
    r = cli("train", "logger=tensorboard", *FAST, "trainer.epochs=2")
    assert r.code == 0, r.text
    run = only_run()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    val = _val_top1(run)
    assert len(val) == 2
    assert _tensorboard_scalars(run / "tensorboard", "val/top1") == [(s, pytest.approx(v)) for s, v in val]
    train_steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert [s for s, _ in _tensorboard_scalars(run / "tensorboard", "train/loss")] == train_steps


def test_mlflow_run_has_metrics_params_and_status():
    pytest.importorskip("mlflow")
    r = cli("train", "logger=mlflow", *FAST)
    assert r.code == 0, r.text
    run = only_run()
    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    assert _mlflow_history(run, "val/top1") == _val_top1(run)
    mlflow_run = _mlflow_client(run).get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == run.name
    assert mlflow_run.data.params["trainer.epochs"] == "1" and mlflow_run.data.params["model.width"] == "16"
    assert _mlflow_client(run).get_experiment(mlflow_run.info.experiment_id).name == "modrun"


def test_mlflow_tracking_uri_and_experiment_from_the_config(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "shared store").as_uri()
    assert cli("train", "logger=mlflow", f"logger.tracking_uri='{store}'", "logger.experiment=kd", *FAST).code == 0
    run = only_run()
    assert not (run / "mlruns").exists()
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert [f.info.run_id for f in found] == [(run / "mlflow_run_id.txt").read_text().strip()]


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_resume_after_a_stop_past_the_checkpoint_keeps_one_series(logger):
    """A stop after records were logged beyond the last checkpoint: the resumed session logs them again,
    and the logger still shows each step once (TensorBoard purges, MLflow skips), in the same MLflow run."""
    pytest.importorskip(logger)
    assert cli("train", f"logger={logger}", *FAST, "trainer.checkpoint_every_steps=0").code == 0
    run = only_run()
    epoch1 = run / "epoch1.pt"
    shutil.copy(run / "checkpoints" / "last.pt", epoch1)
    config = OmegaConf.load(run / "config.yaml")
    config.trainer.epochs = 2  # the first session "was" a 2-epoch run stopped after epoch 1
    OmegaConf.save(config, run / "config.yaml")
    for _ in range(2):  # the second time from the epoch-1 checkpoint again: epoch 2 is logged twice
        shutil.copy(epoch1, run / "checkpoints" / "last.pt")
        status = read_json(run / "status.json")
        (run / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
        r = cli("resume", str(run))
        assert r.code == 0, r.text
    val = _val_top1(run)
    assert len(val) == 2
    expected = [(s, pytest.approx(v)) for s, v in val]
    train_steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    if logger == "tensorboard":
        assert _tensorboard_scalars(run / "tensorboard", "val/top1") == expected
        assert [s for s, _ in _tensorboard_scalars(run / "tensorboard", "train/loss")] == train_steps
    else:
        assert _mlflow_history(run, "val/top1") == expected
        assert [s for s, _ in _mlflow_history(run, "train/loss")] == train_steps
        runs = _mlflow_client(run).search_runs([_mlflow_client(run).get_experiment_by_name("modrun").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_missing_package_is_one_line_before_any_work(logger, monkeypatch):
    monkeypatch.setitem(sys.modules, logger, None)  # find_spec says "not installed", import fails
    r = cli("train", f"logger={logger}", *FAST)
    assert r.code == 2
    assert r.err.strip().splitlines() == [
        f"modrun: error: logger={logger} needs the {logger} package: pip install 'modrun[{logger}]'"
    ]
    assert not Path("runs").exists()


def test_missing_package_on_resume_is_one_line(monkeypatch):
    """`modrun resume` checks the recorded config first: the missing package is named with the file."""
    assert cli("train", *FAST).code == 0
    run = only_run()
    config = OmegaConf.load(run / "config.yaml")
    config.logger = {"name": "mlflow", "tracking_uri": None, "experiment": "modrun"}
    OmegaConf.save(config, run / "config.yaml")
    (run / "status.json").write_text(json.dumps({**read_json(run / "status.json"), "state": "interrupted"}))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    r = cli("resume", str(run))
    assert r.code == 2 and "Traceback" not in r.text  # the lines before it are the run's log
    assert r.err.strip().splitlines()[-1] == (
        f"modrun: error: {run / 'config.yaml'}: logger=mlflow needs the mlflow package: pip install 'modrun[mlflow]'"
    )
    assert read_json(run / "status.json")["state"] == "interrupted"  # refused before it ran: still resumable


def test_metric_names_carry_phase_and_split():
    record = {"step": 3, "epoch": 1, "split": "val", "phase": "m2m_stage0", "top1": 50, "loss": 0.5, "time": 1.0}
    assert dict(metric_items(record)) == {"m2m_stage0/val/top1": 50.0, "m2m_stage0/val/loss": 0.5}
    assert dict(metric_items({"step": 1, "epoch": 0, "split": "train", "lr": 0.1})) == {"train/lr": 0.1}


def test_tensorboard_phase_gets_its_own_folder(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, phase="finetune")
    logger.log({"step": 5, "epoch": 1, "split": "val", "phase": "finetune", "top1": 12.5})
    logger.close()
    logger.close()  # idempotent
    assert _tensorboard_scalars(tmp_path / "tensorboard" / "finetune", "finetune/val/top1") == [(5, 12.5)]


class _Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.status: str | None = None

    def log(self, record: dict) -> None:
        self.records.append(record)

    def close(self, status: str = "completed") -> None:
        self.status = status


def test_metrics_writer_feeds_sinks_and_closes_them_with_the_outcome(tmp_path):
    sink = _Sink()
    with pytest.raises(KeyboardInterrupt), MetricsWriter(tmp_path / "m.jsonl", phase="p", sinks=[sink]) as writer:
        writer.write({"step": 1, "split": "train", "loss": 1.0})
        raise KeyboardInterrupt
    assert sink.records == [{"step": 1, "split": "train", "loss": 1.0, "phase": "p"}]
    assert sink.status == "interrupted"
    failed = _Sink()
    with pytest.raises(ValueError), MetricsWriter(tmp_path / "n.jsonl", sinks=[failed]):
        raise ValueError
    assert failed.status == "failed"


def test_list_shows_loggers_without_importing_them():
    code = (
        "import sys\nfrom modrun.cli import app\n"
        "try:\n    app(['list', 'loggers'], prog_name='modrun')\nexcept SystemExit as e:\n    assert e.code == 0, e\n"
        "assert not {'torch', 'mlflow', 'tensorboard'} & set(sys.modules), 'imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tensorboard" in out.stdout and "mlflow" in out.stdout
