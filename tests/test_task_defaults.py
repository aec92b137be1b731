"""What ranks runs when nobody said: the task's metric (val/top1 for images, val/loss for text) in sweeps, in
`runs compare`, in greedy soups and in `runs list`; a metric named by the user is ranked its natural way."""

import json
from pathlib import Path

from conftest import FAST, cli, only_run, read_json
from test_lm import TINY

LM = [*TINY, "trainer.epochs=1"]


def test_a_language_model_sweep_ranks_by_val_loss_and_an_image_one_by_top1():
    assert cli("sweep", "train", *LM, "seed=0,1", "runs_dir=lm").code == 0
    sweep = next((Path("lm") / "sweeps").iterdir())
    lm = read_json(sweep / "sweep.json")
    assert (lm["objective"], lm["direction"]) == ("val/loss", "minimize")
    values = [j["objective"] for j in lm["jobs"]]
    runs = [sweep / j["run_dir"] for j in lm["jobs"]]
    assert values == [read_json(r / "summary.json")["final"]["val/loss"] for r in runs]

    r = cli("sweep", "train", *FAST, "seed=0,1", "sweep.objective=params", "runs_dir=img")
    assert r.code == 0, r.text
    img = read_json(next((Path("img") / "sweeps").iterdir()) / "sweep.json")
    assert (img["objective"], img["direction"]) == ("params", "minimize")  # a cost: less is better


def test_compare_of_language_model_runs_ranks_by_val_loss_lowest_first():
    for seed in (0, 1, 2):
        assert cli("train", *LM, f"seed={seed}", "optim.lr=3e-3").code == 0
    runs = sorted(str(p) for p in (Path("runs") / "train").iterdir())
    r = cli("runs", "compare", *runs, "--no-plots", "--out", "cmp")
    assert r.code == 0 and "ranked by val/loss (minimize)" in r.out, r.text
    rows = (Path("cmp") / "compare.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(row.split(",")[header.index("val/loss")]) for row in rows[1:]]
    assert losses == sorted(losses) and "val/bpb" in header
    # a metric named by the user is ranked its own way, not the default's
    r = cli("runs", "compare", *runs, "--objective", "val/top1", "--no-plots", "--out", "cmp2")
    assert r.code == 0 and "ranked by val/top1 (maximize)" in r.out, r.text
    listed = cli("runs", "list")
    assert listed.code == 0 and "bpb" in listed.out and "loss" in listed.out, listed.text


def test_a_greedy_soup_of_language_models_accepts_by_val_loss():
    for seed in (0, 1):
        assert cli("train", *LM, f"seed={seed}").code == 0
    runs = sorted(str(p) for p in (Path("runs") / "train").iterdir())
    r = cli("soup", *runs, "soup=greedy")
    assert r.code == 0, r.text
    soup = only_run("soup")
    summary = read_json(soup / "summary.json")
    assert summary["objective"] == "val/loss"
    rows = json.loads((soup / "ingredients.json").read_text())
    first = min(rows, key=lambda row: row["val/loss"])  # the lowest loss goes in first
    assert first["rank"] == 1 and first["kept"]
    second = next(row for row in rows if row["rank"] == 2)
    assert second["kept"] == (second["soup_val"] <= first["soup_val"])
    assert summary["best_ingredient"]["run"] == first["run"]
