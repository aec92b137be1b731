"""Top-k teacher cache for large vocabularies: per training token, the teacher's K most likely tokens (int32) and
their log-probabilities at the term's temperature (fp16), 6 K bytes a token instead of 4 V for a dense row.

The KD term then compares the two distributions over K + 1 buckets: the K cached tokens, and one bucket for
the rest of the vocabulary (the teacher's rest is 1 - the sum of its K probabilities; the student's is its
probability mass outside those K tokens). With K = V there is no rest bucket and the term is the dense one.
The same bucketed form is used from the first step on (when the teacher is still being run), so every epoch
optimises one objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig

TOPK_METHODS = ("kd", "reverse_kl", "jsd")  # divergences of the whole predictive distribution
REST_FLOOR = 1e-6  # the teacher's rest mass never below this: fp16 rounding can make the K probabilities sum past 1


def teacher_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The K most likely tokens of each row (ids, int32) and their log-probabilities at `temperature` (fp16)."""
    logp, ids = F.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
    return ids.int(), logp.half()


class _StudentBuckets(torch.autograd.Function):
    """The student's log-probabilities at temperature T over the K cached tokens and the rest, (N, K + 1), and,
    given targets, a last column with each target's log-probability (the task's cross-entropy, at T = 1).

    Written out, not left to autograd: autograd's gather, masked scatter and second logsumexp, and the task
    loss's own log-softmax, cost several passes over the (tokens, vocabulary) logits each way, more than the
    rest of a small student's step (benchmarks/topk_cache.py). Here one softmax serves all: with upstream
    gradient g over the output columns and G = sum(g), d/dz_j = g_j - p_j G for a cached token j,
    p_j (g_rest / p_rest - G) for any other, plus g_target at the target token. The rest is summed over its
    own tokens (no cancellation in 1 - sum(top)); a probability below the smallest normal float (1e-38 in
    fp32, -87 nats) is read as that float rather than as log(0)."""

    @staticmethod
    def forward(
        ctx, student: torch.Tensor, ids: torch.Tensor, temperature: float, targets: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits too; float64 stays exact
        z = student.detach()
        p = torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1, dtype=dtype)
        cols = [p.gather(-1, ids)]
        p_target = None if targets is None else p.gather(-1, targets[:, None])
        p.scatter_(-1, ids, 0.0)  # p now holds the rest's tokens only
        rest = p.sum(-1, keepdim=True).clamp_min_(torch.finfo(dtype).tiny)
        cols += [rest] if p_target is None else [rest, p_target]
        ctx.save_for_backward(p, ids, cols[0], rest, targets)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return torch.cat(cols, -1).clamp_min_(torch.finfo(dtype).tiny).log_()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        p, ids, p_top, rest, targets = ctx.saved_tensors
        k = ids.shape[-1]
        g_sum = g.sum(-1, keepdim=True)
        grad = p.mul(g[:, k : k + 1] / rest - g_sum)  # every token of the rest (p is 0 at the cached ones)
        grad.scatter_(-1, ids, g[:, :k] - p_top * g_sum)
        if targets is not None:
            grad.scatter_add_(-1, targets[:, None], g[:, k + 1 :])
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None, None


def bucket_logits(
    student: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    temperature: float,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student and teacher logits over the K cached tokens (+ one rest bucket when K < V), scaled so that a
    softmax at `temperature`, as the KD methods take it, gives back each side's bucketed distribution; and,
    given the targets at temperature 1 with K < V, the student's log-probability of each (else None)."""
    ids, t_top = ids.long(), logp.float()
    if ids.shape[-1] == student.shape[-1]:
        z = student / temperature
        return temperature * (z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)), temperature * t_top, None
    if targets is not None and temperature != 1.0:
        raise ValueError("the targets' log-probabilities share the buckets' softmax only at temperature 1")
    k, rows = ids.shape[-1], student.shape[:-1]
    flat_targets = None if targets is None else targets.reshape(-1).long()
    out = _StudentBuckets.apply(
        student.reshape(-1, student.shape[-1]), ids.reshape(-1, k), temperature, flat_targets
    ).reshape(*rows, -1)
    t_rest = torch.log1p(-t_top.exp().sum(-1, keepdim=True).clamp(max=1 - REST_FLOOR))
    target_logp = None if targets is None else out[..., k + 1]
    return temperature * out[..., : k + 1], temperature * torch.cat((t_top, t_rest), -1), target_logp


def topk_temperature(kd: DictConfig) -> float:
    """The one temperature of the terms (checked before any work)."""
    return float(next(iter(kd.terms.values())).get("temperature", 1.0))


def check_topk(cfg: DictConfig) -> list[str]:
    """kd.cache_topk: a count of tokens within the vocabulary, for one teacher's distribution-matching terms."""
    k = cfg.kd.get("cache_topk")
    if k is None:
        return []
    vocab = cfg.data.get("vocab_size") or cfg.data.get("num_classes")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return [f"kd.cache_topk={k}: expected a whole number of tokens >= 1 (or null: a dense cache)"]
    if isinstance(vocab, int) and k > vocab:
        return [f"kd.cache_topk={k}: larger than the vocabulary ({vocab}); use at most {vocab}"]
    errors = [] if cfg.kd.cache_teacher else [f"kd.cache_topk={k} needs kd.cache_teacher=true"]
    temps = set()
    for key, term in (cfg.kd.terms or {}).items():
        name = term.get("name", key)
        if name not in TOPK_METHODS or term.get("student_layer") or term.get("teacher_layer"):
            errors.append(
                f"kd.terms.{key}: kd.cache_topk keeps only the teacher's top-k distribution; "
                f"it serves {', '.join(TOPK_METHODS)} on the outputs, not {name}"
            )
        temps.add(term.get("temperature", 1.0))
    if len(temps) > 1:
        errors.append(f"kd.cache_topk: the terms' temperatures differ ({sorted(temps)}); the cache holds one")
    runs = cfg.teacher.get("run")
    if isinstance(runs, ListConfig) and len(runs) > 1:
        errors.append("kd.cache_topk caches one teacher; teacher.run lists several")
    if cfg.kd.get("m2m") is not None:
        errors.append("kd.cache_topk does not apply to kd=m2m (its stages match features, not distributions)")
    return errors
