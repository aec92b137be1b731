"""Token-level distillation of language models: reverse KL and GKD's JSD against their formulas written out,
token averaging in the objective, and a GPT teacher trained first then reused, through the real CLI."""

import math
from pathlib import Path

import pytest
import torch
from conftest import cli, only_run, read_json

from modrun.components.data.text import text_data
from modrun.components.models.gpt import GPT
from modrun.core.registry import KD_METHODS
from modrun.methods.distill.base import KDContext, Outputs
from modrun.methods.distill.objective import DistillObjective

SMALL = ["experiment=kd_lm_python_docs", "teacher.epochs=1", "teacher.n_layer=1", "teacher.n_embd=32"]
SMALL += ["teacher.n_head=2", "model.n_layer=1", "model.n_embd=32", "data.block_size=32"]
SMALL += ["data.windows_per_epoch=128", "trainer.epochs=1", "trainer.progress=false"]


def _probs(row: list[float], t: float) -> list[float]:
    z = [math.exp(v / t) for v in row]
    return [v / sum(z) for v in z]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _method(name: str, **kw):
    return KD_METHODS.get(name)(KDContext([], [], 7, 1), **kw)


@pytest.mark.parametrize("batch", [16, 128])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_reverse_kl_and_generalised_jsd_are_their_formulas(batch, beta):
    torch.manual_seed(batch)
    s, t = torch.randn(batch, 7, dtype=torch.float64) * 2, torch.randn(batch, 7, dtype=torch.float64) * 2
    tau = 2.0
    ps, pt = [_probs(r, tau) for r in s.tolist()], [_probs(r, tau) for r in t.tolist()]
    reverse = sum(_kl(a, b) for a, b in zip(ps, pt, strict=True)) / batch * tau**2
    got = _method("reverse_kl", temperature=tau)(Outputs(s), Outputs(t), None, None).item()
    assert got == pytest.approx(reverse, rel=1e-10)  # x T^2, like kd
    jsd = 0.0
    for a, b in zip(ps, pt, strict=True):  # a: student, b: teacher; m = beta * teacher + (1 - beta) * student
        if beta == 0.0:
            jsd += _kl(b, a)
        elif beta == 1.0:
            jsd += _kl(a, b)
        else:
            m = [beta * y + (1 - beta) * x for x, y in zip(a, b, strict=True)]
            jsd += beta * _kl(b, m) + (1 - beta) * _kl(a, m)
    got = _method("jsd", beta=beta, temperature=tau)(Outputs(s), Outputs(t), None, None).item()
    assert got == pytest.approx(jsd / batch * tau**2, rel=1e-9)


def test_logit_terms_on_a_language_model_average_over_every_token(tmp_path):
    torch.manual_seed(0)
    data = text_data(bytes(range(256)) * 20, 16, 8, 0.1, 0.1, 64, 0)
    student, teacher = GPT(256, 16, 1, 2, 16), GPT(256, 16, 1, 2, 32)
    kd = {"task_weight": 0.0, "teacher_mode": "mean", "cache_teacher": False,
          "terms": {"kd": {"name": "kd", "weight": 1.0, "temperature": 2.0}}}  # fmt: skip
    from omegaconf import OmegaConf

    objective = DistillObjective(student, [teacher], OmegaConf.create(kd), data, torch.device("cpu"), tmp_path)
    x = torch.randint(0, 256, (4, 16))
    y = torch.randint(0, 256, (4, 16))
    loss, logits, parts = objective.loss(x, y, torch.arange(4))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    expected = 0.0
    for b in range(4):
        for i in range(16):
            expected += _kl(_probs(t[b, i].tolist(), 2.0), _probs(s[b, i].tolist(), 2.0))
    assert logits.shape == (4, 16, 256)
    assert parts["kd_kd"].item() == pytest.approx(expected / 64 * 4.0, rel=1e-4)  # mean over 64 tokens, x T^2


def test_a_gpt_teacher_is_trained_once_and_distills_with_every_divergence():
    for kd in ("kd", "reverse_kl", "jsd"):
        r = cli("distill", *SMALL, f"kd={kd}")
        assert r.code == 0, r.text
    assert len(list((Path("runs") / "train").iterdir())) == 1  # one teacher, reused
    runs = sorted((Path("runs") / "distill").iterdir())
    assert len(runs) == 3
    for run in runs:
        summary = read_json(run / "summary.json")
        assert summary["final"]["val/bpb"] < 8.0 and summary["teachers_frozen_verified"] is True
    assert "kd_jsd" in (runs[-1] / "metrics.jsonl").read_text()
    assert read_json(only_run("train") / "summary.json")["best"]["val/loss"] is not None


def test_the_dense_teacher_cache_serves_text_with_fixed_windows():
    r = cli("distill", *SMALL, "kd.cache_teacher=true", "trainer.epochs=2")
    assert r.code == 0, r.text
    files = list((only_run("distill") / "teacher_cache").glob("*.f32"))
    assert files and files[0].stat().st_size == 128 * 32 * 256 * 4  # windows x tokens x vocabulary, fp32


@pytest.mark.parametrize("terms", ["kd=fitnet", "kd=[kd,cosine]", "kd=vid"])
def test_feature_terms_distill_a_language_models_hidden_states(terms):
    """fitnet / cosine on the last block's hidden states (T, C) of GPTs of different widths, through the CLI: one
    linear map per token bridges 32 -> 48 channels, and the run reports the LM metrics."""
    r = cli("distill", *SMALL, "teacher.n_embd=48", terms)
    assert r.code == 0, r.text
    run = only_run("distill")
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["modules"]["kd"]
    adapter = [v for k, v in weights.items() if k.endswith(("adapters.0.0.weight", "regressors.0.0.weight"))]
    assert [tuple(a.shape) for a in adapter] == [(48, 32)], {k: tuple(v.shape) for k, v in weights.items()}
    assert "val/bpb" in read_json(run / "summary.json")["final"]
