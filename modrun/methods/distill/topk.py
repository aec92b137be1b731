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


def bucket_logits(
    student: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits over the K cached tokens (+ one rest bucket when K < V), scaled so that a
    softmax at `temperature`, as the KD methods take it, gives back each side's bucketed distribution."""
    z = student / temperature
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
    ids = ids.long()
    s_top, t_top = z.gather(-1, ids) - log_norm, logp.float()
    if ids.shape[-1] == z.shape[-1]:
        return temperature * s_top, temperature * t_top
    s_rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - log_norm
    t_rest = torch.log1p(-t_top.exp().sum(-1, keepdim=True).clamp(max=1 - REST_FLOOR))
    return temperature * torch.cat((s_top, s_rest), -1), temperature * torch.cat((t_top, t_rest), -1)


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
