"""`trainer.accumulate_grad_batches` and torch DDP through the real CLI: K batches per optimiser step take the
step of one K times larger batch, alone or on 2 processes; a killed accumulating run resumes bitwise; a
data-parallel model with a parameter that gets no gradient is a clear error (or trains with
trainer.find_unused_parameters=true)."""

import signal
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_subprocess, only_run, read_json
from safetensors.torch import load_file
from test_resume import ARGS, PLUGIN, _assert_identical, _env, _start, _wait_for_step

# an MLP (no BatchNorm, no dropout): a step's gradient is then the same mean however the batch is split
MLP = ["model=mlp", "trainer.epochs=2", "trainer.drop_last=true", "trainer.progress=false", "optim.lr=0.1"]


def _weights(runs: str, command: str = "train") -> dict[str, torch.Tensor]:
    return load_file(only_run(command, Path(runs)) / "model.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("processes", [1, 2])
def test_accumulated_batches_take_the_step_of_one_large_batch(processes):
    assert cli("train", *MLP, "data.batch_size=32", "runs_dir=one").code == 0
    small = 16 // processes
    r = cli(
        "train", *MLP, f"data.batch_size={small}", "trainer.accumulate_grad_batches=2",
        f"trainer.devices={processes}", "device=cpu", "runs_dir=acc",
    )  # fmt: skip
    assert r.code == 0, r.text
    _assert_close(_weights("one"), _weights("acc"))
    one, acc = (read_json(only_run(runs_dir=Path(d)) / "summary.json") for d in ("one", "acc"))
    assert one["steps"] == acc["steps"] == 2 * (1259 // 32)  # optimiser steps, as the scheduler counts them
    # the schedule followed the optimiser steps: the same learning rate at every logged step
    lrs = [[(m["step"], m["lr"]) for m in map(read_json_line, (only_run(runs_dir=Path(d)) / "metrics.jsonl")
            .read_text().splitlines()) if m["split"] == "train"] for d in ("one", "acc")]  # fmt: skip
    assert lrs[0] == lrs[1] and lrs[0]


def read_json_line(line: str) -> dict:
    import json

    return json.loads(line)


def test_an_epoch_that_does_not_divide_ends_with_a_shorter_step():
    """39 batches of 32 per epoch, 4 per step: 9 steps of 4 and one of 3, whose loss is the mean over its 3."""
    common = ["model=mlp", "trainer.epochs=1", "trainer.drop_last=true", "trainer.progress=false"]
    r = cli("train", *common, "data.batch_size=32", "trainer.accumulate_grad_batches=4", "runs_dir=acc")
    assert r.code == 0, r.text
    assert read_json(only_run(runs_dir=Path("acc")) / "summary.json")["steps"] == 10


def test_a_killed_accumulating_run_resumes_bitwise(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    args = [*ARGS, "trainer.accumulate_grad_batches=3", "trainer.checkpoint_every_steps=2"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.02, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 9, proc)  # an epoch is 7 steps of 3 batches
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]
    assert 0 < step < 21 and step % 2 == 0
    done = cli_subprocess("resume", str(run), "+imports=[slowplugin]", cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)


UNUSED = """
from torch import nn
from modrun.components.models.mlp import mlp
from modrun.core.registry import MODELS

class WithSpare(nn.Module):
    def __init__(self, in_channels, image_size, num_classes):
        super().__init__()
        self.net = mlp(in_channels, image_size, num_classes, hidden=(32,))
        self.spare = nn.Linear(4, 4)  # trained, never used in forward

    def forward(self, x):
        return self.net(x)

@MODELS.register("mlp_spare")
def mlp_spare(in_channels: int, image_size: int, num_classes: int, hidden=(32,), dropout: float = 0.0):
    return WithSpare(in_channels, image_size, num_classes)
"""


def test_a_parameter_without_gradient_in_a_data_parallel_run_is_named(tmp_path):
    (tmp_path / "spareplugin.py").write_text(UNUSED)
    args = [
        "+imports=[spareplugin]",
        "model=mlp",
        "model.name=mlp_spare",
        "trainer.epochs=1",
        "trainer.devices=2",
        "device=cpu",
    ]
    env = {"PYTHONPATH": str(tmp_path)}
    r = cli_subprocess("train", *args, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "got no gradient (model.spare.weight, model.spare.bias)" in r.stderr
    assert "trainer.find_unused_parameters=true" in r.stderr
    r = cli_subprocess("train", *args, "trainer.find_unused_parameters=true", "runs_dir=ok", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr


def test_accumulate_grad_batches_below_one_is_refused():
    r = cli("train", "trainer.accumulate_grad_batches=0")
    assert r.code == 2 and "trainer.accumulate_grad_batches=0: must be >= 1" in r.text, r.text
    assert not Path("runs").exists()
