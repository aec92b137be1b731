"""A stitch run rebuilt from its folder (`modrun eval <stitch run> [stitch.point=k]`): the anchors from their
own run folders (named in stitch.json), the stitching layers from model.safetensors or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from modrun.components.build import model_from_run
from modrun.core import checkpoint
from modrun.core.errors import UserError
from modrun.core.runfolder import read_json
from modrun.core.values import take_overrides
from modrun.methods.stitch import STITCH_FILE
from modrun.methods.stitch.net import StitchNet


def stitch_point(run_dir: Path, command: str, overrides: list[str]) -> tuple[int | None, list[str]]:
    """`stitch.point=k` picks one point of a stitch run; returns it and the other overrides."""

    picked, rest = take_overrides(overrides, ("stitch.point",))
    if not picked:
        return None, overrides
    value = picked["stitch.point"]
    if command != "stitch":
        raise UserError(f"stitch.point={value}: {run_dir} is not a stitch run")
    points = read_json(Path(run_dir) / STITCH_FILE)["points"]
    if not value.isdigit() or int(value) not in points:
        raise UserError(f"stitch.point={value}: the run stitched at points {points}")
    return int(value), rest


def stitched_from_run(run_dir: Path, data: object, device: torch.device, weights: str, point: int | None) -> StitchNet:
    """The stitch net of a run with its trained stitches, set to run `point` (default: the run's eval point, whose
    test accuracy summary.json `final` records)."""

    run_dir = Path(run_dir)
    if not (run_dir / STITCH_FILE).exists():
        raise UserError(f"{run_dir} has no {STITCH_FILE} (the stitch run did not finish); try --weights last")
    record = read_json(run_dir / STITCH_FILE)
    small, _ = model_from_run(record["small"]["run"], data, device, "anchors")
    large, _ = model_from_run(record["large"]["run"], data, device, "anchors")
    channels = {int(k): (int(cs), int(cl)) for k, (cs, cl) in record["channels"].items()}
    layer = record.get("layer", "conv1x1")  # runs from before vits were stitchable record no layer
    net = StitchNet(small, large, channels, int(record["eval_point"]), layer).to(device)
    if weights == "final":
        state = load_file(run_dir / "model.safetensors", device=str(device))
        net.stitches.load_state_dict({k.removeprefix("stitches."): v for k, v in state.items()})
    elif weights in ("best", "last"):
        path = run_dir / "checkpoints" / f"{weights}.pt"
        if not path.exists():
            raise UserError(f"{run_dir} has no checkpoints/{weights}.pt")
        net.load_state_dict(checkpoint.load(path, device, run_dir)["modules"]["model"])
    else:
        raise UserError(f"--weights must be final, best or last, got '{weights}'")
    net.point = int(record["eval_point"]) if point is None else point
    return net.eval()
