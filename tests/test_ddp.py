"""Data-parallel runs (`trainer.devices=2`, gloo on CPU) through the real CLI: what they compute, what they
write, and exact resume after the `modrun` process is killed."""

import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, cli_subprocess, only_run, read_json
from safetensors.torch import load_file
from test_resume import ARGS, PLUGIN, _assert_identical, _env, _start, _wait_for_step

TWO = ["trainer.devices=2", "device=cpu"]


def test_two_processes_compute_the_single_process_gradient_steps():
    """An MLP (no BatchNorm) with batch 16 on each of 2 processes takes the same steps as batch 32 on one:
    the sampler's shards together are exactly the single-process batches and the gradients are averaged."""
    common = ["model=mlp", "trainer.epochs=2", "trainer.drop_last=true", "trainer.progress=false", "optim.lr=0.1"]
    assert cli("train", *common, "data.batch_size=32", "runs_dir=one").code == 0
    r = cli("train", *common, *TWO, "data.batch_size=16", "runs_dir=two")
    assert r.code == 0, r.text
    one, two = only_run(runs_dir=Path("one")), only_run(runs_dir=Path("two"))
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    sa, sb = read_json(one / "summary.json"), read_json(two / "summary.json")
    assert sa["steps"] == sb["steps"] == 2 * (1259 // 32)
    assert sa["final"]["test/top1"] == pytest.approx(sb["final"]["test/top1"], abs=0.3)
    # rank 0 alone wrote: one record per logged step, one log line per epoch, every rank's state checkpointed
    records = [r for r in (two / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in r]
    assert len(records) == 2 and (two / "log.txt").read_text().count("epoch 1/2") == 1
    ckpt = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["ranks"]) == 2


def test_killed_data_parallel_run_resumes_bitwise(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    args = [*ARGS, *TWO, "trainer.epochs=2"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.03, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 13, proc)  # an epoch is 10 steps a process
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = run / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    time.sleep(1.0)
    assert last.stat().st_mtime_ns == before  # the workers died with their parent
    assert 0 < torch.load(last, weights_only=True)["state"]["step"] < 20
    done = cli_subprocess("resume", str(run), "+imports=[slowplugin]", cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    assert read_json(run / "status.json")["state"] == "completed"
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)


def test_distill_on_two_processes_trains_its_teacher_once():
    r = cli("distill", *FAST, *TWO, "teacher.width=16", "teacher.epochs=1")
    assert r.code == 0, r.text
    teachers = list((Path("runs") / "train").iterdir())
    assert len(teachers) == 1 and read_json(teachers[0] / "status.json")["state"] == "completed"
    run = only_run("distill")
    assert read_json(run / "summary.json")["teachers_frozen_verified"] is True
    assert len(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["ranks"]) == 2


def test_iterative_pruning_on_two_processes_takes_the_single_process_steps():
    """IMP (its rounds are phases) on 2 processes of batch 16 prunes and trains an MLP as 1 process of batch 32
    does: the same masks, the same weights; rank 0 alone wrote the rewind point and the phase records."""
    common = ["model=mlp", "trainer.drop_last=true", "trainer.progress=false", "optim.lr=0.1"]
    assert cli("train", *common, "trainer.epochs=1", "runs_dir=src").code == 0
    prune = [*common, f"source.run={only_run(runs_dir=Path('src'))}", "prune=imp", "prune.rounds=1"]
    prune += ["prune.sparsity=0.5", "recover=finetune", "trainer.epochs=1"]
    assert cli("prune", *prune, "data.batch_size=32", "runs_dir=one").code == 0
    r = cli("prune", *prune, *TWO, "data.batch_size=16", "runs_dir=two")
    assert r.code == 0, r.text
    one, two = only_run("prune", Path("one")), only_run("prune", Path("two"))
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0) or a[k].dim() == 1, k  # the same masks
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir()
    )
    summary = read_json(two / "summary.json")
    assert summary["speedup_cpu_b64"] > 0 and len(summary["imp_rounds"]) == 2
    assert len(torch.load(two / "checkpoints" / "imp_round1" / "last.pt", weights_only=True)["ranks"]) == 2


def test_grow_and_stitch_on_two_processes_prepare_their_runs_once():
    """The source of a grow run and the anchors of a stitch run are trained first, once, in the parent process;
    the grown and stitched models then train on 2 processes."""
    r = cli("grow", *TWO, "source.epochs=1", "trainer.epochs=1", "trainer.progress=false", "model.width=8")
    assert r.code == 0, r.text
    assert len(list((Path("runs") / "train").iterdir())) == 1
    grown = only_run("grow")
    assert read_json(grown / "grow.json")["grown_model"]["width"] == 16
    assert len(torch.load(grown / "checkpoints" / "last.pt", weights_only=True)["ranks"]) == 2
    anchors = "anchors=[{model:{name:cnn_small,width:8},epochs:1},{model:{name:cnn_small,width:16},epochs:1}]"
    r = cli("stitch", anchors, *TWO, "trainer.epochs=1", "trainer.progress=false")
    assert r.code == 0, r.text
    assert len(list((Path("runs") / "train").iterdir())) == 2  # the grow source (width 8) was reused as anchor 0
    run = only_run("stitch")
    assert len(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["ranks"]) == 2
    assert len(read_json(run / "summary.json")["stitches"]) == 5


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("train", ["trainer.devices=0"], "trainer.devices=0: must be a whole number >= 1"),
        ("distill", ["kd.cache_teacher=true"], "kd.cache_teacher=true is single-process"),
        ("distill", ["kd=crd"], "kd=crd keeps a per-sample memory bank"),
    ],
)
def test_what_data_parallel_runs_do_not_support_is_a_clear_error(command, args, message):
    r = cli(command, *([] if "trainer.devices=0" in args else TWO), *args)
    assert r.code == 2 and message in r.text, r.text
    assert not Path("runs").exists()


def test_modrun_under_an_outside_torchrun_is_a_clear_error(monkeypatch):
    # each torchrun process would otherwise make a whole single-process run folder of its own
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "outside")
    r = cli("train", *FAST)
    assert r.code == 2 and "modrun starts its own processes: run it without torchrun" in r.text, r.text
    assert not Path("runs").exists()
