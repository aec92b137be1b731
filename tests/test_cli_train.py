"""`modrun train` through the real CLI, and the run folder it leaves."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FAST, cli, cli_subprocess, only_run, read_json, read_metrics
from omegaconf import OmegaConf
from safetensors.torch import load_file

from modrun.core.runfolder import reserve_run_dir


def test_train_writes_complete_run_folder():
    r = cli("train", *FAST, "trainer.checkpoint_every_steps=7")
    assert r.code == 0, r.text
    run = only_run()
    assert run.name.endswith("_cnn_small_digits")
    for f in [
        "config.yaml",
        "overrides.txt",
        "command.txt",
        ".hydra/config.yaml",
        "env.json",
        "log.txt",
        "metrics.jsonl",
        "status.json",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "model.safetensors",
    ]:
        assert (run / f).is_file(), f
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["command"] == "train" and status["pid"] > 0
    assert (run / "overrides.txt").read_text().splitlines() == [*FAST, "trainer.checkpoint_every_steps=7"]
    env = read_json(run / "env.json")
    assert env["torch"] == torch.__version__ and "packages" in env and env["cpu_count"] >= 1
    summary = read_json(run / "summary.json")
    assert summary["final"]["test/top1"] > 50 and summary["params"] == summary["nonzero_params"] > 0
    assert summary["macs"] > 0 and summary["latency_ms_batch1"] > 0 and summary["wall_time_s"] > 0
    records = read_metrics(run)
    assert {"train", "val", "train_epoch"} <= {m["split"] for m in records}
    assert all({"step", "epoch", "split"} <= m.keys() for m in records)
    assert any("lr" in m for m in records if m["split"] == "train")
    # config.yaml is resolved and complete: it composes into the same model without Hydra
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.in_channels == 1 and cfg.model.width == 16 and cfg.trainer.epochs == 1
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"modules", "optimizer", "scheduler", "state", "rng", "data_order"} <= ckpt.keys()
    weights = load_file(run / "model.safetensors")
    assert torch.equal(weights["fc.weight"], ckpt["modules"]["model"]["fc.weight"])
    log = (run / "log.txt").read_text()
    assert "epoch 1/1" in log and "completed" in log
    assert "epoch 1/1" in r.err  # the console showed the same lines


def test_git_state_recorded_when_cwd_is_a_repo(tmp_path):
    subprocess.run(["git", "init", "-q"], check=True)
    Path("notes.txt").write_text("x\n")
    subprocess.run(
        ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x", "--allow-empty"], check=True
    )
    assert cli("train", *FAST).code == 0
    run = only_run()
    git = read_json(run / "git.json")
    assert len(git["commit"]) == 40 and git["dirty"] is True  # notes.txt is untracked
    assert (run / "git.diff").exists()


def test_resnet20_on_synthetic_with_overrides():
    r = cli(
        "train",
        "model=resnet20",
        "data=synthetic",
        "optim.lr=0.05",
        "trainer.epochs=1",
        "seed=3",
        "data.size=256",
        "data.image_size=16",
        "model.width=0.5",
        "name=r20",
    )
    assert r.code == 0, r.text
    run = only_run()
    assert run.name.endswith("_r20")
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.name == "resnet20" and cfg.model.in_channels == 3 and cfg.seed == 3 and cfg.optim.lr == 0.05


def test_default_train_reaches_97_percent_on_digits():
    """The README's headline: `modrun train` with no overrides, >= 97% test accuracy."""
    r = cli("train", "trainer.progress=false")
    assert r.code == 0, r.text
    summary = read_json(only_run() / "summary.json")
    assert summary["final"]["test/top1"] >= 97.0, summary["final"]


def test_runs_dir_option_and_experiment(tmp_path):
    r = cli(
        "train",
        "--runs-dir",
        str(tmp_path / "elsewhere"),
        "experiment=digits_resnet20",
        "trainer.epochs=1",
        "model.width=0.25",
        "data.image_size=8",
    )
    assert r.code == 0, r.text
    run = only_run(runs_dir=tmp_path / "elsewhere")
    assert run.name.endswith("_digits_resnet20")
    assert OmegaConf.load(run / "config.yaml").model.name == "resnet20"


def test_cfg_job_prints_config_and_runs_nothing():
    r = cli("train", "--cfg", "job", "optim.lr=0.2")
    assert r.code == 0, r.text
    assert "lr: 0.2" in r.out and "name: cnn_small" in r.out
    assert not Path("runs").exists()
    r = cli("train", "--cfg", "job", "--package", "optim")
    assert r.code == 0 and "momentum" in r.out and "model" not in r.out


def test_validate_prints_resolved_config():
    r = cli("validate", "train", "model=mlp")
    assert r.code == 0, r.text
    assert "image_size: 8" in r.out and "in_channels: 1" in r.out
    assert not Path("runs").exists()


def test_same_second_runs_get_distinct_folders(tmp_path):
    dirs = {reserve_run_dir(tmp_path, "train", "x") for _ in range(5)}
    assert len(dirs) == 5 and all(d.is_dir() for d in dirs)


def test_user_module_registers_a_model(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch\nfrom modrun.core.registry import MODELS\n\n"
        "@MODELS.register('tiny_linear')\n"
        "def tiny_linear(in_channels: int, image_size: int, num_classes: int):\n"
        "    '''One linear layer.'''\n"
        "    flat = in_channels * image_size**2\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(flat, num_classes))\n"
    )
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny_linear.yaml").write_text(
        "name: tiny_linear\nin_channels: ${data.channels}\nimage_size: ${data.image_size}\n"
        "num_classes: ${data.num_classes}\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        r = cli("train", "--config-dir", "conf", "+imports=[my_models]", "model=tiny_linear", *FAST[:1], *FAST[2:])
        bad = cli("train", "--config-dir", "conf", "+imports=[my_modelz]", "model=tiny_linear")
    finally:
        sys.path.remove(str(tmp_path))
    assert bad.code == 2 and "cannot import module 'my_modelz'" in bad.err
    assert r.code == 0, r.text
    assert read_json(only_run() / "summary.json")["params"] == 64 * 10 + 10


def test_help_and_list_do_not_import_torch(tmp_path):
    code = (
        "import sys\nfrom modrun.cli import app\n"
        "for args in (['--help'], ['list'], ['list', 'models'], ['train', '--help']):\n"
        "    try:\n        app(args, prog_name='modrun')\n    except SystemExit as e:\n        assert e.code == 0, e\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "resnet56" in out.stdout and "digits" in out.stdout


def test_console_script_installed():
    r = cli_subprocess("list", "optimizers")
    assert r.returncode == 0 and "adamw" in r.stdout


def test_null_for_a_number_a_recipe_set_means_not_set():
    """lm_python_docs sets windows_per_epoch and grad_clip; null (the data's and trainer's own defaults: one
    pass, no clipping) is accepted for them, while null for another number stays an error."""
    r = cli("validate", "train", "experiment=lm_python_docs", "data.windows_per_epoch=null", "trainer.grad_clip=null")
    assert r.code == 0, r.text
    assert "windows_per_epoch: null" in r.out and "grad_clip: null" in r.out
    r = cli("validate", "train", "experiment=lm_python_docs", "data.block_size=null")
    assert r.code == 2 and "data.block_size=null: expects an integer, got null" in r.err, r.text
