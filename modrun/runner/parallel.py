"""Data-parallel runs over several processes: `trainer.devices=N` (per node) and `trainer.nodes=M`.

The `modrun` process keeps the run's lifecycle (status.json, log.txt) and starts the workers with torch's
elastic launcher, the machinery behind `torchrun`. Every worker runs the same pipeline on its own shard of
each epoch's sample order (DistributedSampler); torch's DistributedDataParallel averages the gradients and
gives every process rank 0's buffers (BatchNorm statistics), so every process holds the same weights
(modrun/engine/strategy.py). Rank 0 alone writes to the run folder; checkpoints carry every rank's RNG state, so
a killed run resumes exactly, with the same number of processes.
"""

from __future__ import annotations

# imports inside functions here defer the elastic launcher (a second of imports) and ctypes: only a run that
# starts workers needs them
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.core.registry import RECIPES, import_user_modules
from modrun.core.runfolder import log_to
from modrun.core.stopping import Interrupted, NonFiniteLoss


def _die_with_parent() -> None:
    """A worker must not outlive a killed `modrun` process (it would keep writing the run folder)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(command: str, plain: dict, run_dir: str, resume: bool) -> dict[str, Any]:
    """One process of the run: join the group, run the pipeline, report how it ended (picklable dicts)."""

    _die_with_parent()
    if "OMP_NUM_THREADS" not in os.environ:
        # processes side by side on one machine share its cores (torchrun sets OMP_NUM_THREADS=1 for this)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    cuda = torch.cuda.is_available() and str(plain.get("device", "auto")) in ("auto", "cuda")
    if cuda:  # device=auto/cuda then means this worker's GPU (the config stays as written: teachers match it)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    cfg = OmegaConf.create(plain)
    try:
        import_user_modules(list(cfg.get("imports") or []))
        pipeline = RECIPES.get(command).run
        if is_main():
            with log_to(Path(run_dir)):
                summary = pipeline(cfg, Path(run_dir), resume)
        else:
            logging.getLogger("modrun").setLevel(logging.WARNING)  # rank 0 speaks for the run
            summary = pipeline(cfg, Path(run_dir), resume)
        return {"ok": True, "summary": summary}
    except (Interrupted, KeyboardInterrupt) as e:
        return {"ok": False, "kind": "interrupted", "message": str(e) or "interrupted"}
    except NonFiniteLoss as e:
        return {"ok": False, "kind": "non_finite", "message": str(e)}
    except UserError as e:
        return {"ok": False, "kind": "bad_input", "message": "; ".join(e.messages)}
    except Exception as e:
        print(traceback.format_exc(), file=sys.stderr)
        return {"ok": False, "kind": "exception", "message": f"{type(e).__name__}: {e}"}
    finally:
        dist.destroy_process_group()


def launch(command: str, cfg: DictConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    """Run the pipeline in `processes(cfg)` workers; return rank 0's summary, or raise what stopped it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    t = cfg.trainer
    nodes, per_node = int(t.get("nodes", 1) or 1), int(t.devices)
    endpoint = t.get("rdzv_endpoint") or ("localhost:0" if nodes == 1 else None)
    if endpoint is None:
        raise UserError("trainer.nodes>1 needs trainer.rdzv_endpoint=<host:port of the first node>")
    config = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=per_node,
        run_id=Path(run_dir).name,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        max_restarts=0,  # a failed worker fails the run; `modrun resume` continues from the checkpoint
        monitor_interval=0.1,
        start_method="spawn",
    )
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        results = elastic_launch(config, _worker)(command, plain, str(run_dir), resume)
    except SignalException as e:
        raise Interrupted(f"stopped by {e.sigval.name}; resumable from the last checkpoint") from None
    except ChildFailedError as e:
        raise RuntimeError(f"a worker process failed: {e}") from None
    outcome = results[0]
    if outcome["ok"]:
        return outcome["summary"]
    kind = {"interrupted": Interrupted, "non_finite": NonFiniteLoss, "bad_input": UserError}
    raise kind.get(outcome["kind"], RuntimeError)(outcome["message"])
