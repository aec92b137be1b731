"""KD methods over logits: Hinton KD, decoupled KD, DIST, logit standardisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modrun.methods.distill.base import KDContext, Outputs


def soft_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) of temperature-softened distributions, times T^2 (keeps gradient scale, Hinton et al.)."""
    t = temperature
    log_ps, log_pt = F.log_softmax(s_logits / t, dim=1), F.log_softmax(t_logits / t, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * t * t


class HintonKD(nn.Module):
    """KL divergence between softened teacher and student predictions."""

    def __init__(self, ctx: KDContext, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return soft_kl(s.logits, t.logits, self.temperature)


class DKD(nn.Module):
    """Decoupled KD: alpha * TCKD (target vs rest, binary) + beta * NCKD (among non-target classes).

    Both KLs are summed over classes, averaged over the batch and multiplied by T^2, as in the reference
    (mdistiller). Its warm-up (the loss ramped in over the first epochs) is the term's `warmup_epochs`."""

    def __init__(self, ctx: KDContext, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> None:
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        temp = self.temperature
        gt = F.one_hot(y, s.logits.shape[1]).bool()
        ps, pt = F.softmax(s.logits / temp, dim=1), F.softmax(t.logits / temp, dim=1)
        # binary (target, non-target) distributions, the non-target mass summed as in the reference
        bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], dim=1)
        bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], dim=1)
        # KL(bt || bs): a teacher probability of 0 contributes 0 (xlogy), as in F.kl_div; the reference takes
        # log(bs) unclamped, here it is floored at the smallest normal float only so log(0) cannot give inf
        log_bs = bs.clamp_min(torch.finfo(bs.dtype).tiny).log()
        tckd = (torch.xlogy(bt, bt) - bt * log_bs).sum(1).mean() * temp**2
        # distributions over the non-target classes only (the target logit is pushed to -inf)
        log_ps_nt = F.log_softmax(s.logits / temp - 1000.0 * gt, dim=1)
        log_pt_nt = F.log_softmax(t.logits / temp - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_ps_nt, log_pt_nt, reduction="batchmean", log_target=True) * temp**2
        return self.alpha * tckd + self.beta * nckd


def _pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation along dim 1, averaged over dim 0."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)).mean()


class DIST(nn.Module):
    """Match relations, not values: beta * inter-class (per sample) + gamma * intra-class (per class) correlation."""

    def __init__(self, ctx: KDContext, temperature: float = 4.0, beta: float = 2.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.temperature, self.beta, self.gamma = temperature, beta, gamma

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ps, pt = F.softmax(s.logits / self.temperature, dim=1), F.softmax(t.logits / self.temperature, dim=1)
        inter = _pearson_distance(ps, pt)
        intra = _pearson_distance(ps.t(), pt.t())
        return (self.beta * inter + self.gamma * intra) * self.temperature**2


def zscore(logits: torch.Tensor) -> torch.Tensor:
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


class LogitStd(nn.Module):
    """Hinton KD on z-score standardised logits, so the student need not match the teacher's logit scale."""

    def __init__(self, ctx: KDContext, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return soft_kl(zscore(s.logits), zscore(t.logits), self.temperature)
