"""Divergences between the student's and the teacher's predictive distributions beyond Hinton's forward KL,
as used to distill language models token by token: reverse KL (the student's mass where the teacher puts
little is penalised: mode-seeking, as in MiniLLM) and the generalised Jensen-Shannon divergence of GKD
(Agarwal et al. ICLR 2024). Logits are (items, vocabulary): the objective flattens a window's tokens into
items, so each loss is a mean over tokens (images: over samples), times T^2 like `kd`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modrun.methods.distill.base import KDContext, Outputs


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class ReverseKL(nn.Module):
    """KL(p_student || p_teacher) of temperature-softened distributions, mean over items, times T^2."""

    def __init__(self, ctx: KDContext, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        tau = self.temperature
        log_ps, log_pt = F.log_softmax(s.logits / tau, dim=-1), F.log_softmax(t.logits / tau, dim=-1)
        return _kl(log_ps, log_pt).mean() * tau * tau


class GeneralizedJSD(nn.Module):
    """GKD's JSD(beta): beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s.
    For small beta it behaves like beta * KL(p_t || p_s) (forward KL) and near 1 like (1 - beta) * KL(p_s || p_t)
    (reverse KL); at exactly 0 and 1 the loss is that KL itself, unscaled, as TRL's GKD trainer computes it."""

    def __init__(self, ctx: KDContext, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta}: must be in [0, 1]")
        self.beta, self.temperature = beta, temperature

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        tau, b = self.temperature, self.beta
        log_ps, log_pt = F.log_softmax(s.logits / tau, dim=-1), F.log_softmax(t.logits / tau, dim=-1)
        if b == 0.0:
            loss = _kl(log_pt, log_ps)
        elif b == 1.0:
            loss = _kl(log_ps, log_pt)
        else:  # log m, computed stably from the two log-distributions
            log_m = torch.logsumexp(torch.stack((log_pt + math.log(b), log_ps + math.log(1 - b))), dim=0)
            loss = b * _kl(log_pt, log_m) + (1 - b) * _kl(log_ps, log_m)
        return loss.mean() * tau * tau
