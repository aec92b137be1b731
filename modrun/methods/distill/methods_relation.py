"""KD methods over relations between samples: PKT, RKD, CRD (on embeddings or flattened features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modrun.methods.distill.base import KDContext, Outputs, flat


def _cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = F.normalize(x, dim=1, eps=eps)
    sim = (x @ x.t() + 1.0) / 2.0  # cosine similarity mapped to [0, 1]
    return sim / sim.sum(1, keepdim=True)


class PKT(nn.Module):
    """Probabilistic knowledge transfer: KL between the two models' conditional probability kernels."""

    def __init__(self, ctx: KDContext, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for fs, ft in zip(s.feats, t.feats, strict=True):
            ps, pt = _cosine_probabilities(flat(fs), self.eps), _cosine_probabilities(flat(ft), self.eps)
            loss = loss + (pt * torch.log((pt + self.eps) / (ps + self.eps))).sum(1).mean()
        return loss


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    return d / d[d > 0].mean().clamp_min(1e-12)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[i, j] = e_j - e_i, unit length
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKD(nn.Module):
    """Relational KD: match normalised pairwise distances (Huber) and triplet angles (Huber)."""

    def __init__(self, ctx: KDContext, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for fs, ft in zip(s.feats, t.feats, strict=True):
            es, et = flat(fs), flat(ft)
            with torch.no_grad():
                dt, at = _pairwise_distances(et), _angles(et)
            loss = loss + self.distance_weight * F.smooth_l1_loss(_pairwise_distances(es), dt)
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(es), at)
        return loss


class CRD(nn.Module):
    """Contrastive representation distillation: a student embedding must pick its teacher embedding out of
    `nce_k` negatives drawn from a memory bank of past embeddings (and vice versa), InfoNCE form."""

    def __init__(
        self, ctx: KDContext, feat_dim: int = 128, nce_k: int = 4096, nce_t: float = 0.07, nce_m: float = 0.5
    ) -> None:
        super().__init__()
        s_dim, t_dim = (int(torch.Size(x[0]).numel()) for x in (ctx.student_shapes, ctx.teacher_shapes))
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)
        self.k, self.temperature, self.momentum = min(nce_k, ctx.num_samples - 1), nce_t, nce_m
        # memory banks of past embeddings, one row per training sample; saved in the checkpoint
        self.register_buffer("memory_s", F.normalize(torch.randn(ctx.num_samples, feat_dim), dim=1))
        self.register_buffer("memory_t", F.normalize(torch.randn(ctx.num_samples, feat_dim), dim=1))

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        vs = F.normalize(self.embed_s(flat(s.feats[0])), dim=1)
        vt = F.normalize(self.embed_t(flat(t.feats[0])), dim=1)
        neg = torch.randint(0, self.memory_s.shape[0], (len(idx), self.k), device=idx.device)
        candidates = torch.cat([idx[:, None], neg], dim=1)  # column 0 is the positive
        target = torch.zeros(len(idx), dtype=torch.long, device=idx.device)
        logits_s = torch.bmm(self.memory_t[candidates], vs.unsqueeze(2)).squeeze(2) / self.temperature
        logits_t = torch.bmm(self.memory_s[candidates], vt.unsqueeze(2)).squeeze(2) / self.temperature
        loss = F.cross_entropy(logits_s, target) + F.cross_entropy(logits_t, target)
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.memory_s[idx] = F.normalize(self.memory_s[idx] * m + vs.detach() * (1 - m), dim=1)
                self.memory_t[idx] = F.normalize(self.memory_t[idx] * m + vt.detach() * (1 - m), dim=1)
        return loss
