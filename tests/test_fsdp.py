"""Fully sharded data-parallel runs (`trainer.strategy=fsdp`, FSDP2 on gloo) through the real CLI: the same
steps as DDP, whole-model checkpoints, plain weights handed back, exact resume after a SIGKILL."""

import signal
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_subprocess, only_run, read_json
from safetensors.torch import load_file
from test_lm import SLOW_GPT, TINY
from test_lm_kd import SMALL
from test_resume import _assert_identical, _env, _start, _wait_for_step

TWO = ["trainer.devices=2", "device=cpu"]
DEEP = [*TINY, "model.n_layer=2", "model.dropout=0.1", "trainer.epochs=2", "trainer.log_every_steps=1"]


def _close(a: Path, b: Path, **tol: float) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **tol)


def test_sharded_training_takes_the_data_parallel_steps():
    """A 2-block GPT with dropout, sharded over 2 processes, trains as DDP does (the same windows, dropout and
    averaged gradients; only reduction order may differ); its checkpoint holds the whole model and the
    optimiser state by parameter name; accumulating 2 batches of 8 is one batch of 16."""
    assert cli("train", *DEEP, *TWO, "runs_dir=ddp").code == 0
    r = cli("train", *DEEP, *TWO, "trainer.strategy=fsdp", "runs_dir=fsdp")
    assert r.code == 0, r.text
    ddp, fsdp = only_run(runs_dir=Path("ddp")), only_run(runs_dir=Path("fsdp"))
    _close(ddp, fsdp, atol=1e-6, rtol=1e-5)
    sa, sb = read_json(ddp / "summary.json"), read_json(fsdp / "summary.json")
    assert sa["steps"] == sb["steps"] == 2 * 4 and sb["params"] == sa["params"] and sb["macs"] == sa["macs"]
    assert sa["final"]["test/bpb"] == pytest.approx(sb["final"]["test/bpb"], abs=1e-4)
    ckpt = torch.load(fsdp / "checkpoints" / "last.pt", weights_only=True)
    plain = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["modules"]["model"].keys() == plain["modules"]["model"].keys()
    assert "model.blocks.1.mlp.fc.weight" in ckpt["optimizer"]["state"]
    assert len(ckpt["ranks"]) == 2
    assert cli("eval", str(fsdp)).code == 0  # a sharded run's folder reads as any other

    r = cli("train", *DEEP, *TWO, "trainer.strategy=fsdp", "data.batch_size=8", "trainer.accumulate_grad_batches=2",
            "model.dropout=0", "runs_dir=acc")  # fmt: skip
    assert r.code == 0, r.text
    assert cli("train", *DEEP, *TWO, "model.dropout=0", "runs_dir=ddp0").code == 0
    _close(only_run(runs_dir=Path("ddp0")), only_run(runs_dir=Path("acc")), atol=2e-5, rtol=1e-4)


def test_sharded_distillation_averages_its_replicated_adapter():
    """The student sharded, the fitnet adapter replicated (its gradients averaged by one all-reduce), gradient
    clipping over both: the same student and adapter as DDP."""
    assert cli("train", *TINY, "trainer.epochs=1", "runs_dir=t").code == 0
    args = [*SMALL, f"teacher.run={only_run(runs_dir=Path('t'))}", "kd=[kd,fitnet]", "model.n_layer=2", *TWO]
    assert cli("distill", *args, "runs_dir=ddp").code == 0
    r = cli("distill", *args, "trainer.strategy=fsdp", "runs_dir=fsdp")
    assert r.code == 0, r.text
    ddp, fsdp = only_run("distill", Path("ddp")), only_run("distill", Path("fsdp"))
    _close(ddp, fsdp, atol=1e-6, rtol=1e-5)
    a = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)["modules"]["kd"]
    b = torch.load(fsdp / "checkpoints" / "last.pt", weights_only=True)["modules"]["kd"]
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_killed_sharded_run_resumes_bitwise(tmp_path):
    (tmp_path / "slowlm.py").write_text(SLOW_GPT)
    args = [*DEEP, *TWO, "trainer.strategy=fsdp", "+imports=[slowlm]", "model.name=slow_gpt", "seed=5"]
    args += ["trainer.checkpoint_every_steps=3"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.05, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 6, proc)  # epoch 2 (4 steps an epoch), after the step-3 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] < 8
    done = cli_subprocess("resume", str(run), "+imports=[slowlm]", cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("train", ["trainer.strategy=fsdp"], "trainer.strategy=fsdp shards the model over several processes"),
        ("train", [*TWO, "trainer.strategy=zero3"], "trainer.strategy=zero3: expected one of ddp, fsdp"),
        ("prune", [*TWO, "trainer.strategy=fsdp", "source.run=x"], "use trainer.strategy=ddp here"),
        ("train", [*TWO, "trainer.strategy=fsdp", "nested=sorted"], "supported by modrun train and modrun distill"),
        ("distill", [*TWO, "experiment=kd_lm_python_docs", "trainer.strategy=fsdp", "kd=m2m"], "or kd=m2m)"),
    ],
)
def test_what_sharding_does_not_support_is_a_clear_error(command, args, message):
    r = cli(command, *TINY, *args)
    assert r.code == 2 and message in r.err, r.text
    assert "Traceback" not in r.text and not Path("runs").exists()
