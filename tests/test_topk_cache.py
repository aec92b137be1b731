"""The top-k teacher cache: its bucketed KD against the formula written out, the dense limit K = V, the cache on
disk (6 K bytes a token), fixed windows, the checks, and exact resume after a SIGKILL, through the real CLI."""

import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli, cli_subprocess, only_run, read_json
from omegaconf import OmegaConf
from test_lm import SLOW_GPT, TINY
from test_lm_kd import SMALL
from test_resume import _assert_identical, _env, _start, _wait_for_step

from modrun.components.data.text import text_data
from modrun.components.models.gpt import GPT
from modrun.methods.distill.objective import DistillObjective
from modrun.methods.distill.topk import bucket_logits, teacher_topk


def _bucketed_kd(s_row: list[float], t_row: list[float], k: int, tau: float) -> float:
    """KL(teacher || student) over the teacher's k most likely tokens plus one bucket for the rest, x tau^2."""

    def probs(row):
        z = [math.exp(v / tau) for v in row]
        return [v / sum(z) for v in z]

    ps, pt = probs(s_row), probs(t_row)
    top = sorted(range(len(t_row)), key=lambda j: -pt[j])[:k]
    qt, qs = [pt[j] for j in top], [ps[j] for j in top]
    if k < len(t_row):
        qt.append(1 - sum(qt))
        qs.append(1 - sum(qs))
    return sum(a * math.log(a / b) for a, b in zip(qt, qs, strict=True)) * tau * tau


def _objective(tmp_path: Path, k: int | None, name: str = "kd", cache: bool = True):
    torch.manual_seed(0)
    data = text_data(bytes(range(256)) * 20, 16, 8, 0.1, 0.1, 64, 0)
    student, teacher = GPT(256, 16, 1, 2, 16), GPT(256, 16, 1, 2, 32)
    kd = {"task_weight": 0.0, "teacher_mode": "mean", "cache_teacher": cache, "cache_topk": k,
          "terms": {name: {"name": name, "weight": 1.0, "temperature": 2.0}}}  # fmt: skip
    return DistillObjective(student, [teacher], OmegaConf.create(kd), data, torch.device("cpu"), tmp_path)


@pytest.mark.parametrize("k", [1, 5, 32])
def test_bucketed_kd_is_the_formula_over_top_k_and_the_rest(tmp_path, k):
    objective = _objective(tmp_path, k)
    x = torch.randint(0, 256, (8, 16))
    _, logits, parts = objective.loss(x, x, torch.arange(8))
    with torch.no_grad():
        t = objective.teachers[0](x)
    rows_s, rows_t = logits.reshape(-1, 256).tolist(), t.reshape(-1, 256).tolist()
    expected = sum(_bucketed_kd(a, b, k, 2.0) for a, b in zip(rows_s, rows_t, strict=True)) / len(rows_s)
    assert parts["kd_kd"].item() == pytest.approx(expected, rel=2e-3)  # the teacher's log-probs are fp16
    _, _, again = objective.loss(x, x, torch.arange(8))  # second time: read from the cache, same value
    assert again["kd_kd"].item() == parts["kd_kd"].item()


@pytest.mark.parametrize("name", ["kd", "reverse_kl", "jsd"])
def test_top_k_over_the_whole_vocabulary_is_the_dense_term(tmp_path, name):
    x = torch.randint(0, 256, (4, 16))
    dense = _objective(tmp_path / "d", None, name, cache=False).loss(x, x, torch.arange(4))[2][f"kd_{name}"]
    full = _objective(tmp_path / "k", 256, name).loss(x, x, torch.arange(4))[2][f"kd_{name}"]
    assert full.item() == pytest.approx(dense.item(), rel=2e-3)


def test_bucket_gradients_flow_only_through_the_student():
    torch.manual_seed(1)
    s = torch.randn(64, 50, dtype=torch.float64, requires_grad=True)
    ids, logp = teacher_topk(torch.randn(64, 50), 8, 1.5)
    assert ids.dtype == torch.int32 and logp.dtype == torch.float16
    s_b, t_b, none = bucket_logits(s, ids, logp, 1.5)
    assert none is None and s_b.shape == t_b.shape == (64, 9)
    assert torch.allclose(torch.softmax(s_b / 1.5, -1).sum(-1), torch.ones(64, dtype=torch.float64))
    (torch.softmax(t_b / 1.5, -1) * -torch.log_softmax(s_b / 1.5, -1)).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _autograd_buckets(student: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """The student's bucket log-probabilities as autograd would take them: cached tokens, and a logsumexp over
    every other token."""
    z = student / tau
    norm = torch.logsumexp(z, -1, keepdim=True)
    rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1, keepdim=True)
    return torch.cat((z.gather(-1, ids), rest), -1) - norm


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_written_out_bucket_gradients_match_autograd_of_the_formula(tau):
    torch.manual_seed(2)
    student = (4 * torch.randn(8, 64, 256, dtype=torch.float64)).requires_grad_()  # 512 tokens, peaked rows
    ids, logp = teacher_topk(torch.randn(8, 64, 256), 32, tau)
    y = torch.randint(0, 256, (8, 64))
    y[0, :8] = ids[0, :8, 0]  # targets among the cached tokens, and (mostly) outside them
    weights = torch.randn(8, 64, 33, dtype=torch.float64)
    s_b, _, target_logp = bucket_logits(student, ids, logp, tau, y if tau == 1.0 else None)
    expected = _autograd_buckets(student, ids.long(), tau)
    loss = (weights * s_b / tau).sum()
    ref_loss = (weights * expected).sum()
    if tau == 1.0:
        loss = loss + 3.0 * -target_logp.mean()
        ref_loss = ref_loss + 3.0 * F.cross_entropy(student.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(s_b / tau, expected, atol=1e-12)
    (grad,), (ref,) = torch.autograd.grad(loss, student), torch.autograd.grad(ref_loss, student)
    assert torch.allclose(grad, ref, atol=1e-12)
    small = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    small_ids = torch.randn(3, 20).topk(4, -1).indices
    targets = torch.tensor([0, small_ids[1, 0].item(), 7]) if tau == 1.0 else None

    def outputs(s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s_b, _, target_logp = bucket_logits(s, small_ids, torch.zeros(3, 4), tau, targets)
        return (s_b,) if target_logp is None else (s_b, target_logp)

    assert torch.autograd.gradcheck(outputs, small)  # the written-out backward against finite differences


def test_the_shared_task_loss_is_the_cross_entropy(tmp_path):
    objective = _objective(tmp_path, 32)
    objective.topk_tau = 1.0  # the term's temperature is 2 in _objective; at 1 the task shares the softmax
    x = torch.randint(0, 256, (8, 16))
    _, logits, parts = objective.loss(x, x, torch.arange(8))
    ce = F.cross_entropy(logits.reshape(-1, 256), x.reshape(-1))
    assert parts["task_loss"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_distill_with_the_top_k_cache_stores_six_bytes_per_token_and_keeps_windows():
    r = cli("distill", *SMALL, "trainer.epochs=2", "kd.cache_teacher=true", "kd.cache_topk=8")
    assert r.code == 0, r.text
    run = only_run("distill")
    ids, logp = sorted((run / "teacher_cache").iterdir())
    tokens = 128 * 32  # windows x block_size
    assert ids.name.endswith(".i32") and logp.name.endswith(".f16")
    assert ids.stat().st_size + logp.stat().st_size == tokens * 8 * 6
    assert read_json(run / "summary.json")["final"]["val/bpb"] < 8.0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert bool(ckpt["extra"]["teacher_cache"]["filled"].all())


def test_cached_text_windows_stay_fixed_per_index_across_epochs():
    data = text_data(bytes(range(256)) * 20, 16, 8, 0.1, 0.1, 64, 0)
    assert not torch.equal(data.train.starts(0, 0), data.train.starts(0, 1))
    data.train.fixed = True
    assert torch.equal(data.train.starts(0, 0), data.train.starts(0, 3))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kd.cache_teacher=true", "kd.cache_topk=0"], "kd.cache_topk=0: expected a whole number of tokens >= 1"),
        (["kd.cache_teacher=true", "kd.cache_topk=300"], "kd.cache_topk=300: larger than the vocabulary (256)"),
        (["kd.cache_topk=8"], "kd.cache_topk=8 needs kd.cache_teacher=true"),
        (["kd.cache_teacher=true", "kd.cache_topk=8", "kd=dkd"], "it serves kd, reverse_kl, jsd on the outputs"),
        (["kd.cache_teacher=true", "kd.cache_topk=abc"], "kd.cache_topk=abc"),
    ],
)
def test_bad_top_k_settings_are_one_line_errors(args, message):
    r = cli("distill", *SMALL, *args)
    assert r.code == 2 and message in r.err, r.text
    assert "Traceback" not in r.text and not Path("runs").exists()


def test_killed_top_k_cached_distillation_resumes_bitwise(tmp_path):
    """The cache mask, the memory-mapped top-k files and the fixed windows all continue after a SIGKILL."""
    (tmp_path / "slowlm.py").write_text(SLOW_GPT)
    env = _env(tmp_path, 0)
    teacher = cli_subprocess("train", "--runs-dir", "t", *TINY, "trainer.epochs=1", cwd=tmp_path, env=env)
    assert teacher.returncode == 0, teacher.stderr
    args = [*SMALL, f"teacher.run={only_run(runs_dir=tmp_path / 't')}", "+imports=[slowlm]", "model.name=slow_gpt"]
    args += ["trainer.epochs=2", "kd.cache_teacher=true", "kd.cache_topk=4", "trainer.checkpoint_every_steps=3"]
    args += ["trainer.log_every_steps=1", "model.dropout=0.1"]
    ref = cli_subprocess("distill", "--runs-dir", "ref", *args, cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.05, "distill", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 6, proc)  # epoch 2 (4 steps an epoch): reading the cache
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cli_subprocess("resume", str(run), "+imports=[slowlm]", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run("distill", runs_dir=tmp_path / "ref"), run)
