"""Data-parallel runs over several processes: `trainer.devices=N` (per node) and `trainer.nodes=M`.

The `modrun` process keeps the run's lifecycle (status.json, log.txt) and starts the workers with torch's
elastic launcher, the machinery behind `torchrun`. Every worker runs the same pipeline on its own shard of
each epoch's sample order (DistributedSampler), gradients are all-reduced after each backward pass and
buffers (BatchNorm statistics) broadcast from rank 0, as DistributedDataParallel does, so every process
holds the same weights. Rank 0 alone writes to the run folder; checkpoints carry every rank's RNG state, so
a killed run resumes exactly, with the same number of processes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun.errors import UserError
from modrun.stopping import Interrupted, NonFiniteLoss


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def processes(cfg: DictConfig) -> int:
    """How many processes a run asks for (1: the ordinary single-process run)."""
    trainer = cfg.get("trainer") or {}
    return int(trainer.get("devices", 1) or 1) * int(trainer.get("nodes", 1) or 1)


def in_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


# ------------------------------------------------------------------------------------------ inside the loop


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """This rank's share of an epoch's sample order: torch's DistributedSampler, seeded so that its global
    permutation is the single-process one (padded to a multiple of the world size, then rank::world)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), world_size(), rank(), shuffle=shuffle, seed=seed * 1_000_003)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce the gradients in one flat buffer and divide by the world size (DDP's averaging)."""
    for p in params:
        if p.grad is None:  # every rank must send the same layout
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def broadcast_state(modules: Iterable[nn.Module], buffers_only: bool = True) -> None:
    """Rank 0's buffers (and, at the start, parameters too) on every rank, one flat message per dtype."""
    tensors = [t.data for m in modules for t in (m.buffers() if buffers_only else m.state_dict().values())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order in every process
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(group)
        dist.broadcast(flat, src=0)
        for t, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group), strict=True):
            t.copy_(synced)


def reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each running metric over ranks (keys in the same order everywhere: they come from one code path)."""
    if world_size() == 1 or not sums:
        return sums
    keys = sorted(sums)
    flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind(0), strict=True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when any rank says so: all ranks stop (and save) at the same step."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def own_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """This process's random state and partial metric sums from a checkpoint."""
    ranks = ckpt.get("ranks")
    if ranks is None and world_size() == 1:
        return {"rng": ckpt["rng"], "sums": ckpt["state"]["sums"]}
    written_by = len(ranks) if ranks is not None else 1
    if written_by != world_size():
        raise UserError(
            f"the checkpoint was written by {written_by} process(es), this run has {world_size()}: "
            f"resume with the same trainer.devices x trainer.nodes"
        )
    return ranks[rank()]


class DiscardMetrics:
    """The metrics writer of every process but rank 0: records go nowhere."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> DiscardMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def gather_objects(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------- the launcher


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
    if command == "distill" and not cfg.teacher.run and not cfg.teacher.checkpoint:
        from modrun.distill.teachers import ensure_teacher_run

        ensure_teacher_run(cfg)  # trained here, once (itself data-parallel); each worker then finds and reuses it
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


def _worker(command: str, plain: dict, run_dir: str, resume: bool) -> dict[str, Any]:
    """One process of the run: join the group, run the pipeline, report how it ended (picklable dicts)."""
    import logging
    import traceback

    from modrun.pipelines.common import pipeline_for
    from modrun.registry import import_user_modules
    from modrun.runs import log_to

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
        pipeline = pipeline_for(command)
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


def _die_with_parent() -> None:
    """A worker must not outlive a killed `modrun` process (it would keep writing the run folder)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
