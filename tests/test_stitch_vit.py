"""`modrun stitch` of two vit anchors (SN-Net's DeiT case): stages, the per-token least-squares fit, the real CLI
with an independently computed stitched accuracy, and bad input."""

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cli, only_run, read_json
from omegaconf import OmegaConf
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from modrun.components.build import build_data, model_from_run
from modrun.components.data.base import Preprocess, batches
from modrun.components.models.vit import ViT
from modrun.methods.stitch.net import boundary_features, build, least_squares

QUICK = ["trainer.epochs=1", "trainer.progress=false"]
# tiny vits: 2 blocks, 2 heads, 16 patches of 2x2 (+ the class token), 9 steps of an epoch
VIT = ["model=vit", "model.depth=2", "model.heads=2", "model.patch=2", "data.batch_size=128"]
VIT += ["optim=adamw", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def anchors(tmp_path_factory) -> tuple[Path, Path]:
    """Two completed vit runs of width 16 and 32 (depth 2, 1 epoch), shared by the tests of this file."""
    root = tmp_path_factory.mktemp("vit_anchors")
    for dim in (16, 32):
        r = cli("train", "--runs-dir", str(root / f"d{dim}"), *QUICK, *VIT, f"model.dim={dim}")
        assert r.code == 0, r.text
    return only_run("train", root / "d16"), only_run("train", root / "d32")


def _digits(n: int) -> torch.Tensor:
    """The first n real digit images, scaled to [0, 1] as modrun feeds them."""
    return torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)


def _vit(dim: int, seed: int = 1) -> ViT:
    torch.manual_seed(seed)
    return ViT(1, 10, 8, patch=2, depth=2, heads=2, dim=dim, dropout=0.1).eval()


def test_vit_stages_compose_to_forward_and_identical_anchors_stitch_to_identity():
    model, x = _vit(16), _digits(64)
    keys = list(model.state_dict())
    stages = model.stages()
    assert len(stages) == 2 + 1  # block 0 (with the embedding), block 1, the readout
    assert torch.equal(torch.nn.Sequential(*stages)(x), model(x))
    assert list(model.state_dict()) == keys  # stages share the model's parameters and add no keys
    used = {p.data_ptr() for p in torch.nn.Sequential(*stages).parameters()}
    assert used == {p.data_ptr() for p in model.parameters()}
    net = build(model, copy.deepcopy(model), [0, 1], x)
    for k in (0, 1):
        stitch = net.stitches[str(k)]
        assert isinstance(stitch, torch.nn.Linear) and stitch.weight.shape == (16, 16)
        torch.testing.assert_close(stitch.weight.detach(), torch.eye(16), atol=1e-4, rtol=0)
        torch.testing.assert_close(net(x, k), model(x), atol=1e-4, rtol=0)


def test_token_least_squares_is_the_minimum_norm_lstsq_with_bias():
    small, large, x = _vit(16), _vit(32, seed=2), _digits(256)
    fs, fl = boundary_features(small, x), boundary_features(large, x)
    assert fs[0].shape == (256, 17, 16) and fl[0].shape == (256, 17, 32)
    dead = fs[1].clone()
    dead[..., 3] = 0  # a dead feature: only the minimum-norm solution is unique
    for k, front in ((0, fs[0]), (1, fs[1]), (1, dead)):
        a = front.reshape(-1, 16).double().numpy()  # every token of every sample is a row
        a = np.concatenate([a, np.ones((len(a), 1))], 1)
        sol = np.linalg.lstsq(a, fl[k].reshape(-1, 32).double().numpy(), rcond=None)[0]  # SVD: minimum norm
        w, b = least_squares(front, fl[k])
        assert w.shape == (32, 16) and b.shape == (32,)
        np.testing.assert_allclose(w.numpy(), sol[:-1].T, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(b.numpy(), sol[-1], atol=1e-5, rtol=1e-4)
    assert w[:, 3].abs().max() < 1e-6  # the dead feature gets no weight
    net = build(small, large, [0, 1], x)  # the fitted layers are the stitches, and beat a random start
    fitted = net.stitches["0"](fs[0])
    random = torch.nn.Linear(16, 32)(fs[0]).detach()
    assert ((fitted - fl[0]) ** 2).mean() < 0.5 * ((random - fl[0]) ** 2).mean()


@torch.no_grad()
def _stitched_top1(small: ViT, large: ViT, w: torch.Tensor, b: torch.Tensor, k: int, run: Path) -> float:
    """Test top-1 of the stitch at k, written out here: the small vit's tokens and blocks 0..k, the linear map of
    every token, the large vit's blocks k+1.., its norm, class token and head."""
    cfg = OmegaConf.load(run / "config.yaml")
    data = build_data(cfg)
    prep, correct, total = Preprocess(data, torch.device("cpu")), 0, 0
    for x, y, _ in batches(data.test, int(cfg.data.eval_batch_size)):
        x = prep(x)
        t = small.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([small.cls_token.expand(len(t), -1, -1), t], 1) + small.pos_embed
        for block in small.blocks[: k + 1]:
            t = block(t)
        t = F.linear(t, w, b)
        for block in large.blocks[k + 1 :]:
            t = block(t)
        logits = large.head(large.norm(t)[:, 0])
        correct, total = correct + int((logits.argmax(1) == y).sum()), total + len(y)
    return 100.0 * correct / total


def test_stitch_two_vit_anchors(anchors):
    small, large = anchors
    r = cli("stitch", f"anchors=[{large},{small}]", *QUICK)
    assert r.code == 0, r.text
    run = only_run("stitch")
    rows = read_json(run / "summary.json")["stitches"]
    by = {r["model"]: r for r in rows}
    assert by.keys() == {"small", "large", "stitch@0", "stitch@1"}
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    assert by["small"]["test/top1"] == read_json(small / "summary.json")["final"]["test/top1"]
    assert by["large"]["params"] == read_json(large / "summary.json")["params"]
    record = read_json(run / "stitch.json")
    assert record["points"] == [0, 1] and record["layer"] == "linear" and record["small"]["run"] == str(small)
    assert record["channels"] == {"0": [16, 32], "1": [16, 32]}
    state = load_file(run / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"stitches.{k}.{p}": shape for k in (0, 1) for p, shape in (("weight", (32, 16)), ("bias", (32,)))
    }
    assert by["small"]["params"] < by["stitch@1"]["params"] < by["stitch@0"]["params"] < by["large"]["params"]
    cpu = torch.device("cpu")
    data = build_data(OmegaConf.load(run / "config.yaml"))
    fs, fl = (model_from_run(a, data, cpu, "anchors")[0].eval() for a in (small, large))
    for k in (0, 1):
        w, b = state[f"stitches.{k}.weight"], state[f"stitches.{k}.bias"]
        assert by[f"stitch@{k}"]["test/top1"] == pytest.approx(_stitched_top1(fs, fl, w, b, k, run), abs=1e-9)
    r = cli("eval", str(run), "stitch.point=0")  # the stitched model loads back from the run folder
    assert r.code == 0 and f"{by['stitch@0']['test/top1']:.2f}" in r.out, r.text


def _fake(src: Path, dest: Path, **changes) -> Path:
    """A copy of an anchor run whose config.yaml is changed (dotted key -> value)."""
    shutil.copytree(src, dest)
    cfg = OmegaConf.load(dest / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return dest


def test_bad_vit_inputs_are_one_line_and_leave_no_run(anchors, tmp_path):
    small, large = anchors
    assert cli("train", "--runs-dir", str(tmp_path / "cnn"), *QUICK, "model.width=8").code == 0
    cnn = only_run("train", tmp_path / "cnn")
    deeper = _fake(large, tmp_path / "deeper", model__depth=3)
    patch4 = _fake(large, tmp_path / "patch4", model__patch=4)
    cases = {
        (f"anchors=[{small},{cnn}]",): "anchors: different model families (vit vs cnn_small)",
        (f"anchors=[{small},{large}]", "stitch.points=[2]"): "stitch.points=[2]: vit has stitch points 0..1 (after",
        (f"anchors=[{small},{deeper}]",): "vit anchors of model.depth 2 vs 3",
        (f"anchors=[{small},{patch4}]",): "vit anchors of model.patch 2 vs 4 (17 vs 5 tokens)",
    }
    for overrides, message in cases.items():
        r = cli("stitch", "trainer.progress=false", *overrides)
        assert r.code == 2 and message in r.err, (overrides, r.err)
        assert "Traceback" not in r.text and len(r.err.strip().splitlines()) == 1, r.err
    assert not Path("runs").exists()


def test_vit_anchor_configs_are_trained_first_and_checked_again_once_trained():
    """Anchors given as vit configs are trained first; a depth one leaves unset (the model config's 4) is known
    only then, and the mismatch is still a one-line error that leaves no stitch run."""
    tiny = "heads:2,patch:2},epochs:0,overrides:['optim=adamw']}"
    r = cli("stitch", f"anchors=[{{model:{{name:vit,dim:16,depth:2,{tiny},{{model:{{name:vit,dim:32,{tiny}]", *QUICK)
    last = "modrun: error: anchors: vit anchors of model.depth 2 vs 4;"  # after the anchors' training logs
    assert r.code == 2 and r.err.strip().splitlines()[-1].startswith(last) and "Traceback" not in r.text, r.text
    assert len(list(Path("runs/train").iterdir())) == 2 and not Path("runs/stitch").exists()
    r = cli(
        "stitch", f"anchors=[{{model:{{name:vit,dim:16,depth:2,{tiny},{{model:{{name:vit,dim:32,depth:2,{tiny}]", *QUICK
    )
    assert r.code == 0, r.text
    assert read_json(only_run("stitch") / "stitch.json")["layer"] == "linear"
