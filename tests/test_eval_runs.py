"""`modrun eval`, `modrun runs list/show`, `modrun list` through the real CLI."""

import json

from conftest import FAST, cli, only_run, read_json


def test_eval_reproduces_recorded_test_accuracy_and_takes_overrides():
    assert cli("train", *FAST).code == 0
    run = only_run()
    recorded = read_json(run / "summary.json")["final"]["test/top1"]
    r = cli("eval", str(run))
    assert r.code == 0, r.text
    assert f"{recorded:.2f}" in r.out
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert record["test/top1"] == recorded and record["weights"] == "final"
    r = cli("eval", str(run), "--weights", "best", "data.image_size=16")
    assert r.code == 0, r.text
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert record["overrides"] == ["data.image_size=16"] and record["weights"] == "best"
    r = cli("eval", str(run), "data=synthetic")
    assert r.code == 2 and "model.in_channels=1 does not fit the data" in r.err
    r = cli("eval", str(run), "data.batch_sizee=3")
    assert r.code == 2 and "did you mean data.batch_size" in r.err


def test_runs_list_and_show():
    assert cli("train", *FAST, "name=first").code == 0
    run = only_run()
    r = cli("runs", "list", "runs")
    assert r.code == 0 and "first" in r.out and "completed" in r.out
    r = cli("runs", "show", str(run))
    assert r.code == 0 and "test/top1" in r.out and "trainer.epochs=1" in r.out
    assert cli("runs", "list", "nowhere").code == 2


def test_list_groups():
    r = cli("list")
    assert r.code == 0
    for name in ("resnet110", "cnn_small", "digits", "cifar10", "sgd", "adamw", "cosine", "step"):
        assert name in r.out
    r = cli("list", "datasets")
    assert "image_folder" in r.out and "resnet20" not in r.out
    r = cli("list", "kd")
    assert r.code == 0 and "Zhao et al. CVPR 2022" in r.out and "crd" in r.out
