"""prune=wanda on a GPT: the paper's score and block order written here independently, N:M masks, the CLI with
recovery (masks kept, exact resume after a SIGKILL), and its bad input."""

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, cli, cli_subprocess, only_run
from safetensors.torch import load_file
from test_lm import SLOW_GPT, TINY
from test_resume import _assert_identical, _env, _start, _wait_for_step
from test_width_prune import _llama

from modrun.components.models.gpt import GPT
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.wanda import wanda

GPT_ARGS = [*TINY, "model.n_layer=2"]


def _gpt_and_calibration() -> tuple[GPT, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(256, 32, n_layer=2, n_head=2, n_embd=64).eval()
    return model, [torch.randint(0, 256, (16, 32)) for _ in range(4)]


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _reference_masks(model: GPT, calib: list[torch.Tensor], sparsity: float) -> dict[str, np.ndarray]:
    """Block by block: inputs recorded on the model pruned so far, |W| * ||X_j||, the row's lowest dropped."""
    masks = {}
    for i in range(len(model.blocks)):
        names = [n for n in _linears(model) if n.startswith(f"blocks.{i}.")]
        inputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        layers = _linears(model)
        hooks = [layers[n].register_forward_pre_hook(lambda m, a, got=inputs[n]: got.append(a[0].numpy().copy()))
                 for n in names]  # fmt: skip
        with torch.no_grad():
            for x in calib:
                model(x)
        for h in hooks:
            h.remove()
        for n in names:
            x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in inputs[n]]).astype(np.float64)
            w = layers[n].weight.detach().numpy()
            score = np.abs(w) * np.sqrt((x**2).sum(0))[None, :]
            drop = int(w.shape[1] * sparsity)
            mask = np.ones_like(w, dtype=bool)
            np.put_along_axis(mask, np.argsort(score, axis=1)[:, :drop], False, axis=1)
            masks[n] = mask
            with torch.no_grad():
                layers[n].weight.mul_(torch.from_numpy(mask))
    return masks


def test_wanda_masks_are_the_papers_block_by_block():
    model, calib = _gpt_and_calibration()
    reference_model, _ = _gpt_and_calibration()
    expected = _reference_masks(reference_model, calib, 0.5)
    targets = _linears(model)
    ctx = PruneContext(model, targets, 0, calib[0], 256, Path("."), calibration=lambda n: lambda: iter(calib[:n]))
    pruner = wanda(ctx, sparsity=0.5, calib_batches=4)
    pruner.start(0)
    assert set(expected) == set(targets)
    for name, mask in expected.items():
        got = pruner.masks[name].numpy()
        assert (got != mask).mean() < 1e-3, name  # float32 vs float64 scores may swap a tie-close pair
        assert got.sum(1).tolist() == [mask.shape[1] - mask.shape[1] // 2] * mask.shape[0]
    # not magnitude pruning: the activations change which weights go
    w = targets["blocks.1.mlp.fc"].weight
    assert not torch.equal(pruner.masks["blocks.1.mlp.fc"], w.abs() >= w.abs().median(dim=1, keepdim=True).values)


def test_n_m_keeps_the_best_n_of_every_m_inputs():
    model, calib = _gpt_and_calibration()
    ctx = PruneContext(model, _linears(model), 0, calib[0], 256, Path("."), calibration=lambda n: lambda: iter(calib))
    pruner = wanda(ctx, n_m=[2, 4], calib_batches=4)
    pruner.start(0)
    for name, m in _linears(model).items():
        groups = pruner.masks[name].reshape(m.out_features, -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name
        assert bool((m.weight.reshape(m.out_features, -1, 4) != 0).sum(-1).le(2).all())
    assert pruner.current == 0.5


def test_wanda_through_the_cli_keeps_its_masks_while_recovering():
    assert cli("train", *GPT_ARGS, "trainer.epochs=2", "runs_dir=src").code == 0
    source = f"source.run={only_run(runs_dir=Path('src'))}"
    r = cli("prune", *GPT_ARGS, source, "prune=wanda", "prune.sparsity=0.5", "recover=finetune", "trainer.epochs=1")
    assert r.code == 0, r.text
    weights = load_file(only_run("prune") / "model.safetensors")
    fc = weights["blocks.0.mlp.fc.weight"]
    assert ((fc == 0).sum(1) >= fc.shape[1] // 2).all()  # every row still half zeros after fine-tuning
    assert not (weights["tok_emb.weight"] == 0).any()  # the embedding (and the tied head) is never pruned


def test_killed_wanda_recovery_resumes_bitwise(tmp_path):
    (tmp_path / "slowlm.py").write_text(SLOW_GPT)
    env = _env(tmp_path, 0)
    src = cli_subprocess("train", "--runs-dir", "src", *GPT_ARGS, "trainer.epochs=1", cwd=tmp_path, env=env)
    assert src.returncode == 0, src.stderr
    args = [*GPT_ARGS, f"source.run={only_run(runs_dir=tmp_path / 'src')}", "+imports=[slowlm]"]
    args += ["model.name=slow_gpt", "model.dropout=0.1", "prune=wanda", "prune.n_m=[2,4]", "recover=finetune"]
    args += ["trainer.epochs=2", "trainer.checkpoint_every_steps=3", "trainer.log_every_steps=1"]
    ref = cli_subprocess("prune", "--runs-dir", "ref", *args, cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.05, "prune", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cli_subprocess("resume", str(run), "+imports=[slowlm]", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run("prune", runs_dir=tmp_path / "ref"), run)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune.types=[Conv2d]"], "prune=wanda scores Linear layers by their input features"),
        (["prune.include=[features.*]"], "prune: no Linear layer matches"),
        (["prune.n_m=[4,2]"], "prune.n_m=[4, 2]: expected [N, M] with 0 < N < M"),
        (["prune.calib_batches=0"], "prune.calib_batches=0: must be >= 1"),
        (["prune.sparsity=0.5"], "prune=wanda: the only Linear layer chosen is the output head (fc)"),
    ],
)
def test_wanda_bad_input_is_one_line(args, message):
    r = cli("prune", *FAST, "prune=wanda", *args)
    assert r.code == 2 and message in r.err and "Traceback" not in r.text, r.text
    assert not (Path("runs") / "prune").exists()


@pytest.mark.parametrize("n_m", [None, "[2,4]"])
def test_wanda_on_a_hugging_face_llama_through_the_cli(tmp_path, n_m):
    """Every projection of every block gets Wanda's per-row masks; the LM head and embeddings stay dense."""
    _llama(tmp_path)  # a tiny 2-block Llama saved to tmp_path/llama
    text = ["data=python_docs", "data.block_size=32", "data.windows_per_epoch=64", "data.batch_size=16"]
    r = cli("train", "model=hf", f"model.path={tmp_path / 'llama'}", *text, "trainer.epochs=0", "runs_dir=src")
    assert r.code == 0, r.text
    how = [f"prune.n_m={n_m}"] if n_m else ["prune.sparsity=0.5"]
    r = cli("prune", f"source.run={only_run(runs_dir=Path('src'))}", "prune=wanda", *how, "recover=none")
    assert r.code == 0, r.text
    weights = load_file(only_run("prune") / "model.safetensors")
    projections = [k for k in weights if ".layers." in k and k.endswith("_proj.weight")]
    assert len(projections) == 2 * 7
    for key in projections:
        w = weights[key]
        if n_m:
            assert bool((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()), key
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), key
    assert (
        not (weights["model.lm_head.weight"] == 0).any() and not (weights["model.model.embed_tokens.weight"] == 0).any()
    )
    assert cli("eval", str(only_run("prune"))).code == 0


def test_wanda_on_a_vit_keeps_the_classifier_dense():
    r = cli("train", "model=vit", "data=digits", *FAST[:1], "model.depth=2", "model.dim=32", "model.heads=4",
            "data.batch_size=64", "trainer.progress=false", "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    r = cli("prune", f"source.run={only_run(runs_dir=Path('src'))}", "prune=wanda", "prune.n_m=[2,4]", "recover=none")
    assert r.code == 0, r.text
    weights = load_file(only_run("prune") / "model.safetensors")
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight"):
        assert bool((weights[key].reshape(weights[key].shape[0], -1, 4) != 0).sum(-1).eq(2).all()), key
    assert not (weights["head.weight"] == 0).any()
