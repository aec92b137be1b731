"""Bad input through the real CLI: one line per problem naming the key, closest valid choice, exit 2,
no traceback, and no run folder left behind."""

from pathlib import Path

import pytest
from conftest import cli

CASES = [
    (["optim.lrr=0.1"], ["unknown key optim.lrr — did you mean optim.lr?"]),
    (["model=resnet2"], ["model=resnet2: no such model config — did you mean resnet20?"]),
    (["data=digitz"], ["data=digitz: no such data config — did you mean digits?"]),
    (["optim=sgdd"], ["optim=sgdd: no such optim config — did you mean sgd?"]),
    (["optim.lr=abc"], ["optim.lr=abc: expects a number"]),
    (["trainer.epochs=1.5"], ["trainer.epochs=1.5: expects an integer"]),
    (["trainer.deterministic=maybe"], ["trainer.deterministic=maybe: expects true or false"]),
    (["model.widht=3"], ["unknown key model.widht — did you mean model.width?"]),
    (["+model.depth=3"], ["model.depth: not an argument of model 'cnn_small'"]),
    (["model.name=resnet2"], ["model.name=resnet2: unknown model — did you mean resnet20?"]),
    (["+foo=1"], ["unknown key foo"]),
    (["device=gpu"], ["device=gpu: expected auto, cpu, cuda, cuda:N or mps"]),
    (["optim.lr=nan"], ["optim.lr=nan: must be a finite number"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1: must be > 0"]),
    (["data.batch_size=0"], ["data.batch_size=0: must be >= 1"]),
    (["data=image_folder"], ["missing value for data.path", "missing value for data.num_classes"]),
    (["data=image_folder", "data.path=nowhere", "data.num_classes=3"], ["data.path=nowhere: no such file"]),
    (["data=cifar10", "data.root=nowhere"], ["data.root=nowhere: no such file"]),
    (["~trainer.foo"], ["~trainer.foo: no key trainer.foo to delete"]),
    (["+optim.lr=1"], ["+optim.lr: optim.lr already exists"]),
    (["optim.lr=[1"], ["bad override syntax"]),
    (["sched.name=cosin"], ["sched.name=cosin: unknown scheduler — did you mean cosine?"]),
    (["+sched.warmup=2"], ["sched.warmup: not an argument of scheduler 'cosine' — did you mean warmup_epochs?"]),
    (["+data.colour=1"], ["data.colour: not an argument of dataset 'digits'"]),
    (["model=mlp", "model.hidden=5"], ["model.hidden=5: expects a list"]),
    (["+imports=[not_a_module_xyz]"], ["imports: cannot import module 'not_a_module_xyz'"]),
    (["data.val_fraction=0.7", "data.test_fraction=0.5"], ["must be in [0, 1) and sum to less than 1"]),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(overrides, expected):
    for command in (["validate", "train"], ["train"]):
        r = cli(*command, *overrides)
        assert r.code == 2, (command, r.text)
        assert "Traceback" not in r.text
        lines = r.err.strip().splitlines()
        assert all(line.startswith("modrun: error: ") for line in lines), lines
        for fragment in expected:
            assert any(fragment in line for line in lines), (fragment, lines)
        assert not any(Path("runs").rglob("status.json")), "a run folder was left behind"


def test_many_problems_are_reported_together():
    r = cli("train", "optim.lrr=0.1", "model=resnet2", "trainer.epochs=x", "device=gpu", "+foo=1")
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 5, r.err


def test_bad_run_folders_and_options():
    assert "not a modrun run folder" in cli("resume", "nowhere").err
    assert cli("resume", "nowhere").code == 2
    assert cli("eval", ".").code == 2
    r = cli("train", "--cfg", "jobs")
    assert r.code == 2 and "--cfg must be job, hydra or all" in r.err
    r = cli("validate", "trian")
    assert r.code == 2 and "did you mean train" in r.err
    r = cli("list", "modles")
    assert r.code == 2 and "did you mean models" in r.err
    r = cli("train", "--config-dir", "nowhere")
    assert r.code == 2 and "--config-dir" in r.err


def test_hydra_may_not_run_code_or_change_directory(tmp_path):
    """Hydra instantiates hydra.callbacks from `_target_`; a colleague's config must not be able to use that."""
    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "evil.yaml").write_text("# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: os.system\n")
    cases = [
        (["+hydra.callbacks.x._target_=os.system"], "hydra.callbacks: modrun runs no code named in a config"),
        (["--config-dir", str(tmp_path / "myconf"), "experiment=evil"], "hydra.callbacks"),
        (["hydra.job.chdir=true"], "hydra.job.chdir=true: a modrun run never changes directory"),
    ]
    for args, message in cases:
        r = cli("train", *args)
        assert r.code == 2 and message in r.text, r.text
    assert not Path("runs").exists()
