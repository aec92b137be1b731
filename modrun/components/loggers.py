"""Extra metric sinks beside metrics.jsonl (which stays the source of truth). Registry `loggers`.

`loop.fit` builds one logger per phase of a run as `Logger(run_dir, phase, resume_step, **args of cfg.logger)`;
it receives every metrics.jsonl record through `log(record)` and ends with `close(status)`, status being how
the phase ended (completed, interrupted or failed). `resume_step` is the checkpoint step a resumed phase goes
on from (None when it starts afresh): the records after it were logged before the stop and come again.
A logger that needs an optional package says so with `requires = (module, pip requirement)`; validation
checks it, and no such package is imported before the logger is built.
"""

from __future__ import annotations

# imports inside functions here defer the optional sinks (tensorboard, mlflow): only the chosen one is needed
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError
from modrun.core.registry import LOGGERS, missing_package
from modrun.core.runfolder import atomic_write

LOGGERS.lazy("none", "modrun.components.loggers:NullLogger", "metrics.jsonl only")
LOGGERS.lazy(
    "tensorboard", "modrun.components.loggers:TensorBoardLogger", "TensorBoard event files in <run>/tensorboard"
)
LOGGERS.lazy(
    "mlflow", "modrun.components.loggers:MlflowLogger", "one MLflow run per modrun run; default store <run>/mlruns"
)

NOT_METRICS = {"step", "epoch", "split", "phase", "time"}  # record keys that place a record rather than measure


def build_logger(cfg: DictConfig, run_dir: Path, phase: str | None, resume_step: int | None) -> Any:
    """The logger that `cfg.logger` names, for one phase of the run in `run_dir`."""
    node = cfg.get("logger") or {"name": "none"}
    name = str(node["name"])
    factory = LOGGERS.get(name)
    missing = missing_package(factory, f"logger={name}")
    if missing:  # validation reports this for a new run; a resumed one may meet another environment
        raise UserError(missing)
    args = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(node), resolve=True).items() if k != "name"}
    return factory(Path(run_dir), phase, resume_step, **args)


def metric_items(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) of each metric of a record, named `[<phase>/]<split>/<metric>`, e.g. `val/top1`."""
    prefix = "/".join(str(p) for p in (record.get("phase"), record.get("split")) if p)
    for key, value in record.items():
        if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


class NullLogger:
    """Writes nothing beyond metrics.jsonl."""

    def __init__(self, run_dir: Path, phase: str | None = None, resume_step: int | None = None) -> None:
        self.run_dir = run_dir

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self, status: str = "completed") -> None:
        pass


class TensorBoardLogger:
    """Scalars in TensorBoard event files under <run>/tensorboard[/<phase>] (`tensorboard --logdir runs`)."""

    requires = ("tensorboard", "modrun[tensorboard]")

    def __init__(self, run_dir: Path, phase: str | None = None, resume_step: int | None = None) -> None:
        self.log_dir = Path(run_dir) / "tensorboard" / (phase or "")
        # TensorBoard hides what an earlier session wrote at steps >= purge_step; metrics.jsonl keeps the
        # records up to and including the resume step, so only those after it are purged (and logged again)
        self.purge_step = None if resume_step is None else resume_step + 1
        self.writer: Any = None  # opened by the first record: a finished phase that is resumed adds no file

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        for name, value in metric_items(record):
            self.writer.add_scalar(name, value, global_step=int(record["step"]))
        # flushed like metrics.jsonl: points up to the checkpoint are never logged again, so a kill must not lose them
        self.writer.flush()

    def close(self, status: str = "completed") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowLogger:
    """One MLflow run per modrun run; its id is kept in <run>/mlflow_run_id.txt so that resume continues it."""

    requires = ("mlflow", "modrun[mlflow]")
    STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(
        self,
        run_dir: Path,
        phase: str | None = None,
        resume_step: int | None = None,
        tracking_uri: str | None = None,
        experiment: str = "modrun",
    ) -> None:
        # MLflow 3 refuses file stores unless this is set, and modrun's default store is one: a folder in the run
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        self.client = MlflowClient(tracking_uri or (run_dir / "mlruns").resolve().as_uri())
        self.resumed, self.closed = resume_step is not None, False
        self.last_step: dict[str, int] = {}  # per metric, the last step MLflow already has (resumed runs only)
        id_file = run_dir / "mlflow_run_id.txt"
        if id_file.exists():  # a later phase, or a resumed run: go on with the same MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create_run(run_dir, experiment)
            atomic_write(id_file, self.run_id + "\n")

    def _create_run(self, run_dir: Path, experiment: str) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(experiment)
            except MlflowException:  # another job of a sweep created it first
                experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        run = self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={"modrun.run_dir": str(run_dir.resolve())}
        )
        params = [Param(k, v) for k, v in _flat_config(run_dir / "config.yaml")]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in metric_items(record) if step > self._last_step(k)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _last_step(self, key: str) -> int:
        """The last step of `key` that MLflow has. MLflow cannot delete points, so a resumed run skips the
        records after its checkpoint that the stopped session already sent (exact resume: the same values)."""
        if not self.resumed:
            return -1
        if key not in self.last_step:
            history = self.client.get_metric_history(self.run_id, key)
            self.last_step[key] = max((m.step for m in history), default=-1)
        return self.last_step[key]

    def close(self, status: str = "completed") -> None:
        if not self.closed:
            self.closed = True
            self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED"))


def _flat_config(path: Path) -> Iterator[tuple[str, str]]:
    """The run's resolved config.yaml as MLflow params: `trainer.epochs` -> "15"."""
    if not path.exists():
        return

    def flatten(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], str(node)[:500]  # older MLflow versions refuse longer values

    yield from flatten(OmegaConf.to_container(OmegaConf.load(path)), "")
