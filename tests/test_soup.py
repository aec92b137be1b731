"""`modrun soup` through the real CLI: uniform and greedy soups, sweeps, sparse soups, bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, only_run, read_json
from safetensors.torch import load_file

# fine-tuning (a prune run that removes nothing, recover=finetune) from one source: ingredients that share
# their start, as in the paper, so that their average is a meaningful model
TUNE = ["trainer.epochs=1", "model.width=16", "optim.lr=0.1", "trainer.progress=false"]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs shared by the tests (made once, in a folder of their own): dense fine-tunes d0-d2, sparse
    fine-tunes s0/s1 of one magnitude mask, r0 with a random mask, c0 channel-pruned, and w8, a narrower model."""
    root = tmp_path_factory.mktemp("farm")
    out = f"runs_dir={root}"
    assert cli("train", *FAST, out).code == 0
    source = f"source.run={only_run('train', root)}"
    jobs = {f"d{s}": ["prune.sparsity=0", f"seed={s}"] for s in range(3)}
    jobs |= {f"s{s}": ["prune.sparsity=0.7", f"seed={s}"] for s in range(2)}
    jobs["r0"] = ["prune=random", "prune.sparsity=0.7"]
    jobs["c0"] = ["prune=channel", "prune.ratio=0.5", "recover=none"]
    for name, overrides in jobs.items():
        assert cli("prune", *TUNE, out, source, f"name={name}", *overrides).code == 0
    assert cli("train", *FAST, out, "model.width=8", "name=w8").code == 0
    runs = {p.name.rsplit("_", 1)[-1]: p for kind in ("train", "prune") for p in (root / kind).iterdir()}
    return {name: runs[name] for name in [*jobs, "w8"]}


def test_soup_takes_runs_dir_like_the_other_commands(farm, tmp_path):
    r = cli("soup", str(farm["d0"]), str(farm["d1"]), "--runs-dir", str(tmp_path / "elsewhere"))
    assert r.code == 0, r.text
    _assert_mean(only_run("soup", tmp_path / "elsewhere"), [farm["d0"], farm["d1"]])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _assert_mean(soup: Path, ingredients: list[Path]) -> None:
    states = [_weights(r) for r in ingredients]
    for key, value in _weights(soup).items():
        if value.is_floating_point():  # BatchNorm running statistics are averaged too
            assert torch.equal(value, torch.stack([s[key] for s in states]).mean(dim=0)), key
        else:  # num_batches_tracked: the first ingredient's
            assert torch.equal(value, states[0][key]), key


def test_uniform_soup_is_the_mean_and_a_run_folder(farm):
    dense = [farm["d0"], farm["d1"], farm["d2"]]
    r = cli("soup", *map(str, dense))
    assert r.code == 0, r.text
    soup = only_run("soup")
    _assert_mean(soup, dense)
    for name in ("config.yaml", "env.json", "log.txt", "ingredients.json", "summary.json"):
        assert (soup / name).is_file(), name
    status, summary = read_json(soup / "status.json"), read_json(soup / "summary.json")
    assert status["state"] == "completed" and status["command"] == "soup"
    rows = json.loads((soup / "ingredients.json").read_text())
    assert [row["run"] for row in rows] == list(map(str, dense)) and all(row["kept"] for row in rows)
    assert rows[0]["val/top1"] == read_json(dense[0] / "summary.json")["final"]["val/top1"]
    assert summary["kept"] == 3 and summary["params"] == read_json(dense[0] / "summary.json")["params"]
    assert summary["best_ingredient"]["val/top1"] == max(row["val/top1"] for row in rows)
    assert "uniform soup" in r.out and "soup" in r.out
    r = cli("eval", str(soup))  # the soup's folder rebuilds its model like any run folder
    assert r.code == 0 and f"{summary['final']['test/top1']:.2f}" in r.out, r.text
    assert cli("eval", str(soup), "data=digits", "data.eval_batch_size=7").code == 0
    r = cli("runs", "list", "runs")
    assert r.code == 0 and str(soup) in r.out and "soup" in r.out


def test_greedy_soup_starts_from_the_best_and_keeps_what_does_not_hurt(farm):
    dense = [farm["d2"], farm["d0"], farm["d1"]]
    r = cli("soup", *map(str, dense), "soup=greedy", "name=greedy")
    assert r.code == 0, r.text
    soup = only_run("soup")
    assert soup.name.endswith("_greedy")
    rows = sorted(json.loads((soup / "ingredients.json").read_text()), key=lambda row: row["rank"])
    assert rows[0]["kept"] and rows[0]["val/top1"] == max(row["val/top1"] for row in rows)
    best = rows[0]["soup_val"]
    for row in rows[1:]:  # kept exactly when adding it did not lower the soup's val accuracy
        assert row["kept"] == (row["soup_val"] >= best)
        best = max(best, row["soup_val"]) if row["kept"] else best
    _assert_mean(soup, [Path(row["run"]) for row in rows if row["kept"]])
    assert read_json(soup / "summary.json")["kept"] == sum(row["kept"] for row in rows)


def test_sweep_folder_soups_its_completed_jobs(farm):
    sweep = Path("runs/sweeps/2026-01-01_00-00-00_tune")
    sweep.mkdir(parents=True)
    shutil.copytree(farm["d0"], sweep / "0")  # a job folder inside the sweep, given relative to it
    (sweep / "0" / "summary.json").unlink()  # no recorded scores: the soup evaluates the ingredient itself
    failed = sweep / "2"
    shutil.copytree(farm["d2"], failed)
    status = read_json(failed / "status.json")
    (failed / "status.json").write_text(json.dumps({**status, "state": "failed"}))  # its own status wins
    shutil.copytree(farm["d1"], sweep / "1")
    jobs = [
        {"run_dir": "0", "state": "completed"},
        {"run_dir": "1", "state": "completed"},
        {"run_dir": "2", "state": "completed"},
        {"run_dir": "3", "state": "failed"},
    ]
    # a job folder outside the sweep is refused (issue #15: paths read from a record stay inside it)
    outside = [*jobs[:1], {"run_dir": str(farm["d1"].resolve()), "state": "completed"}]
    (sweep / "sweep.json").write_text(json.dumps({"jobs": outside}))
    r = cli("soup", str(sweep))
    assert r.code == 2 and "points outside" in r.err and "Traceback" not in r.text, r.text
    (sweep / "sweep.json").write_text(json.dumps({"jobs": jobs}))
    r = cli("soup", str(sweep))
    assert r.code == 0, r.text
    soup = only_run("soup")
    rows = json.loads((soup / "ingredients.json").read_text())
    assert [row["run"] for row in rows] == [str(sweep / "0"), str(sweep / "1")]
    assert rows[0]["val/top1"] == read_json(farm["d0"] / "summary.json")["final"]["val/top1"]
    assert "skipping" in (soup / "log.txt").read_text()
    _assert_mean(soup, [farm["d0"], farm["d1"]])


def test_sparse_soup_keeps_the_shared_mask(farm):
    r = cli("soup", str(farm["s0"]), str(farm["s1"]))
    assert r.code == 0, r.text
    soup = only_run("soup")
    _assert_mean(soup, [farm["s0"], farm["s1"]])
    weights, first = _weights(soup), _weights(farm["s0"])
    layers = [k for k in weights if k.endswith("weight") and weights[k].dim() >= 2]
    for k in layers:
        assert torch.equal(weights[k] == 0, first[k] == 0), k
    sparsity = read_json(soup / "summary.json")["sparsity"]
    assert sparsity["layers"] == len(layers) and sparsity["soup"] == sparsity["ingredients"] == pytest.approx(0.7, 0.02)
    assert "shared mask kept" in r.err


def test_channel_pruned_soup_rebuilds_its_smaller_model(farm):
    shutil.copytree(farm["c0"], "c1")  # recover=none: a second pruning of the source would be the same
    r = cli("soup", str(farm["c0"]), "c1")
    assert r.code == 0, r.text
    soup = only_run("soup")
    assert (soup / "model_shapes.json").read_text() == (farm["c0"] / "model_shapes.json").read_text()
    _assert_mean(soup, [farm["c0"], Path("c1")])
    r = cli("eval", str(soup))
    assert r.code == 0 and f"{read_json(soup / 'summary.json')['final']['test/top1']:.2f}" in r.out, r.text


def test_incompatible_runs_are_bad_input(farm):
    cases = {
        (farm["d0"], farm["w8"]): f"{farm['w8']}: model.width=8 but {farm['d0']} has 16",
        (farm["s0"], farm["r0"]): "have different sparsity masks in layer",
        (farm["d0"], farm["s0"]): "sparse soups need a shared mask",
        (farm["d0"], farm["c0"]): "model_shapes.json (pruned layer sizes) differs",
    }
    for runs, message in cases.items():
        r = cli("soup", *map(str, runs))
        assert r.code == 2 and message in r.err, (runs, r.err)
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.text
    assert not Path("runs/soup").exists() or not any(Path("runs/soup").iterdir())


def test_bad_arguments(farm):
    d0, d1 = str(farm["d0"]), str(farm["d1"])
    Path("empty").mkdir()
    cases = {
        (d0, d1, "soup=gredy"): "soup=gredy: expected one of uniform, greedy, task_arithmetic, ties, dare — did you "
        "mean greedy?",
        (d0, d1, "soupp=greedy"): "unknown key soupp — did you mean soup?",
        (d0, d1, "soup.x=1"): "unknown key soup.x — did you mean soup?",
        (d0, d1, "objective=test/top1"): "did you mean val/top1?",
        (d0, d1, "seed=abc"): "seed=abc: expects an integer",
        (d0, "nowhere"): "'nowhere' is not a folder",
        (d0, "empty"): "'empty' is neither a run folder",
        (d0,): "a soup needs at least 2 completed runs, found 1",
        ("soup=greedy",): "no runs given",
    }
    for args, message in cases.items():
        r = cli("soup", *args)
        assert r.code == 2 and message in r.err, (args, r.err)
        assert "Traceback" not in r.text
    assert not Path("runs").exists()


def test_task_arithmetic_adds_scaled_task_vectors_to_the_common_base(farm):
    dense = [farm["d0"], farm["d1"]]
    base_run = Path(_source(dense[0]))
    r = cli("soup", *map(str, dense), "soup=task_arithmetic", "scale=0.5", "layer_scales.fc=0.25", "name=ta")
    assert r.code == 0, r.text
    soup = only_run("soup")
    summary = read_json(soup / "summary.json")
    assert summary["base"] == str(base_run) and summary["scale"] == 0.5
    [record] = read_json(soup / "prerequisites.json")  # the base, recorded as every needed run is
    assert (record["role"], record["run"], record["how"]) == (
        "base",
        str(base_run),
        "the source.run of every ingredient",
    )
    assert record["sha256"] == hashlib.sha256((base_run / "model.safetensors").read_bytes()).hexdigest()
    assert f"base: {base_run} (the source.run of every ingredient" in cli("runs", "show", str(soup)).text
    base, states, merged = _weights(base_run), [_weights(d) for d in dense], _weights(soup)
    for key, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[key], b), key
            continue
        layer = 0.25 if key.startswith("fc.") else 1.0
        expected = b + 0.5 * layer * sum(s[key] - b for s in states)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
    assert cli("eval", str(soup)).code == 0


def test_task_arithmetic_chooses_the_scale_on_val_and_checks_its_base(farm):
    dense = [farm["d0"], farm["d1"], farm["d2"]]
    r = cli("soup", *map(str, dense), "soup=task_arithmetic", "scale_grid=[0.3,1.0]")
    assert r.code == 0, r.text
    summary = read_json(only_run("soup") / "summary.json")
    assert summary["scale"] in (0.3, 1.0)
    bad = cli("soup", *map(str, dense), "soup=task_arithmetic", f"base={farm['w8']}")
    assert bad.code == 2 and "model.width=" in bad.text, bad.text
    mixed = cli("soup", str(farm["d0"]), str(farm["w8"]), "soup=task_arithmetic")
    assert mixed.code == 2
    unknown = cli("soup", *map(str, dense), "soup=task_arithmetic", "layer_scales.nope=0.5")
    assert unknown.code == 2 and "layer_scales.nope: no weights under that module path" in unknown.text


def _source(run: Path) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(run / "config.yaml").source.run)


def _deltas(farm, names: list[str]) -> tuple[dict, list[dict], list[str]]:
    base = _weights(Path(_source(farm[names[0]])))
    keys = [k for k, b in base.items() if b.is_floating_point()]
    return base, [{k: _weights(farm[n])[k] - base[k] for k in keys} for n in names], keys


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries(farm):
    """Against the paper's three steps written here over the flattened task vectors (numpy, not modrun's code)."""
    import numpy as np

    names = ["d0", "d1", "d2"]
    r = cli("soup", *(str(farm[n]) for n in names), "soup=ties", "soup.density=0.3", "scale=0.8")
    assert r.code == 0, r.text
    soup = only_run("soup")
    summary = read_json(soup / "summary.json")
    assert summary["soup"] == "ties" and summary["density"] == 0.3 and summary["scale"] == 0.8
    base, taus, keys = _deltas(farm, names)
    flat = np.stack([np.concatenate([t[k].numpy().ravel() for k in keys]) for t in taus])
    keep = int(flat.shape[1] * 0.3)
    for row in flat:  # trim: the 30 % largest magnitudes of each whole task vector
        row[np.abs(row) < np.sort(np.abs(row))[-keep]] = 0.0
    elected = np.sign(flat.sum(0))
    agree = (np.sign(flat) == elected) & (flat != 0)
    merged_tau = (flat * agree).sum(0) / np.maximum(agree.sum(0), 1)
    merged, offset = _weights(soup), 0
    for k in keys:
        n = base[k].numel()
        expected = base[k] + 0.8 * torch.from_numpy(merged_tau[offset : offset + n]).reshape(base[k].shape)
        torch.testing.assert_close(merged[k], expected.float(), rtol=0, atol=1e-5)
        offset += n
    assert 0.05 < float((merged_tau != 0).mean()) < 0.9  # trimmed: most entries of 3 x 30 % survive in one


def test_dare_drops_and_rescales_each_task_vector_seeded(farm):
    """Every entry of the merged vector is a sum of some of the runs' entries over (1 - p); each run keeps about
    1 - p of its entries; the same seed gives the same soup, another seed another."""
    names, p = ["d0", "d1"], 0.6
    runs = [str(farm[n]) for n in names]
    for seed in (3, 3, 4):
        r = cli("soup", *runs, "soup=dare", f"drop_rate={p}", "scale=1", f"seed={seed}", f"name=dare{seed}")
        assert r.code == 0, r.text
    soups = sorted((Path("runs") / "soup").iterdir())
    assert read_json(soups[0] / "summary.json")["drop_rate"] == p
    base, (t0, t1), keys = _deltas(farm, names)
    a, b, c = (_weights(s) for s in soups)
    assert all(torch.equal(a[k], b[k]) for k in keys) and not all(torch.equal(a[k], c[k]) for k in keys)
    kept0 = total = 0
    for k in keys:
        delta = (a[k] - base[k]).ravel()
        x, y = t0[k].ravel() / (1 - p), t1[k].ravel() / (1 - p)
        options = torch.stack([torch.zeros_like(x), x, y, x + y])  # which of the two runs' entries survived
        err = (options - delta).abs()
        choice = err.argmin(0)
        assert bool((err.min(0).values <= 1e-5 + 1e-4 * delta.abs()).all()), k
        informative = (x.abs() > 1e-6) & (y.abs() > 1e-6) & ((x - y).abs() > 1e-6)
        kept0 += int(((choice == 1) | (choice == 3))[informative].sum())
        total += int(informative.sum())
    assert total > 1000 and abs(kept0 / total - (1 - p)) < 0.05


def test_lines_scales_the_merged_vector_by_block_depth(farm):
    """cnn_small's blocks features.0, features.1, features.3 get alpha, alpha + beta/2 and alpha + beta; its head
    (after the last block) alpha + beta, as LiNeS's l = 1..L."""
    names = ["d0", "d1"]
    r = cli("soup", *(str(farm[n]) for n in names), "soup=task_arithmetic", "scale=1", "lines.alpha=0.2",
            "lines.beta=0.6")  # fmt: skip
    assert r.code == 0, r.text
    soup = only_run("soup")
    assert read_json(soup / "summary.json")["lines"] == {"alpha": 0.2, "beta": 0.6}
    base, taus, keys = _deltas(farm, names)
    depth = {"features.0.": 0.2, "features.1.": 0.5, "features.3.": 0.8, "fc.": 0.8}
    merged = _weights(soup)
    for k in keys:
        scale = next(v for prefix, v in depth.items() if k.startswith(prefix))
        torch.testing.assert_close(merged[k], base[k] + scale * (taus[0][k] + taus[1][k]), rtol=0, atol=1e-6)


def test_merging_settings_and_families_are_checked_before_any_work(farm, tmp_path):
    runs = [str(farm["d0"]), str(farm["d1"])]
    cases = {
        ("soup=ties", "soup.density=0"): "density=0: soup=ties keeps this fraction of each task vector",
        ("soup=ties", "density=1.5"): "must be in (0, 1]",
        ("soup=dare", "drop_rate=1"): "drop_rate=1: soup=dare drops task-vector entries",
        ("soup=ties", "lines.alpha=0.5"): "LiNeS needs both, as numbers",
        ("soup=uniform", "lines.alpha=0.5", "lines.beta=0.5"): "LiNeS scales task vectors: use soup=task_arithmetic",
        ("soup=tie",): "did you mean ties?",
    }
    for args, message in cases.items():
        r = cli("soup", *runs, *args)
        assert r.code == 2 and message in r.err, (args, r.err)
    gpt = ["model=gpt", "data=python_docs", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
           "data.block_size=32", "data.windows_per_epoch=32", "trainer.epochs=1", "trainer.progress=false",
           f"runs_dir={tmp_path}"]  # fmt: skip
    assert cli("train", *gpt).code == 0
    r = cli("soup", runs[0], str(only_run("train", tmp_path)), "soup=ties")
    assert r.code == 2 and "soup ingredients need the same model" in r.err and "Traceback" not in r.text, r.text
    assert not (Path("runs") / "soup").exists()


def _lines_soup(train: list[str]) -> tuple[list[Path], dict, dict, list[dict]]:
    """A source trained with `train`, two fine-tunes of it, and their task-arithmetic soup with LiNeS alpha 0.2,
    beta 0.6: the fine-tunes, the soup's weights, the source's, and the two task vectors."""
    assert cli("train", *train, "trainer.epochs=1", "trainer.progress=false", "runs_dir=src").code == 0
    source = only_run("train", Path("src"))
    tunes = []
    for seed in (1, 2):
        r = cli("prune", f"source.run={source}", "prune.sparsity=0", "recover=finetune", "trainer.epochs=1",
                f"seed={seed}", f"runs_dir=ft{seed}", "trainer.progress=false")  # fmt: skip
        assert r.code == 0, r.text
        tunes.append(only_run("prune", Path(f"ft{seed}")))
    r = cli("soup", *map(str, tunes), "soup=task_arithmetic", "scale=1", "lines.alpha=0.2", "lines.beta=0.6")
    assert r.code == 0, r.text
    merged, base = _weights(only_run("soup")), _weights(source)
    return tunes, merged, base, [{k: _weights(t)[k] - base[k] for k in base} for t in tunes]


def test_lines_and_ties_on_gpt_fine_tunes(tmp_path):
    """A GPT's blocks are LiNeS's layers: the embeddings scale as block 1, blocks.i as alpha + beta i / (L - 1),
    the final norm as block L; TIES and DARE merge the same GPT runs."""
    gpt = ["model=gpt", "data=python_docs", "model.n_layer=3", "model.n_embd=32", "model.n_head=2",
           "data.block_size=32", "data.windows_per_epoch=32"]  # fmt: skip
    tunes, merged, base, taus = _lines_soup(gpt)
    depth = {"tok_emb.": 0.2, "pos_emb.": 0.2, "blocks.0.": 0.2, "blocks.1.": 0.5, "blocks.2.": 0.8, "ln_f.": 0.8}
    for k, b in base.items():
        scale = next(v for prefix, v in depth.items() if k.startswith(prefix))
        torch.testing.assert_close(merged[k], b + scale * (taus[0][k] + taus[1][k]), rtol=0, atol=1e-6)
    for soup in (["soup=ties", "density=0.5"], ["soup=dare", "drop_rate=0.5"]):
        r = cli("soup", *map(str, tunes), *soup, "runs_dir=more")
        assert r.code == 0 and "test/bpb" in read_json(only_run("soup", Path("more")) / "summary.json")["final"], r.text
        shutil.rmtree("more")


def test_ties_with_lines_on_vit_fine_tunes(tmp_path):
    """A ViT's blocks are LiNeS's layers too: the patch embedding scales as block 1, the head as block L."""
    tunes, merged, base, taus = _lines_soup(["model=vit", "data=digits", "model.depth=2", "model.dim=32",
                                             "model.heads=2", "data.batch_size=64"])  # fmt: skip
    for k, b in base.items():
        scale = 0.8 if k.startswith(("blocks.1.", "norm", "head")) else 0.2
        torch.testing.assert_close(merged[k], b + scale * (taus[0][k] + taus[1][k]), rtol=0, atol=1e-6)
    r = cli("soup", *map(str, tunes), "soup=ties", "density=0.5", "lines.alpha=0.5", "lines.beta=0.5", "runs_dir=t")
    assert r.code == 0 and "test/top1" in read_json(only_run("soup", Path("t")) / "summary.json")["final"], r.text
