"""KD methods over relations between samples: PKT, RKD, CRD (on embeddings or flattened features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modrun.methods.distill.base import KDContext, Outputs, flat


def _cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-stochastic kernel of cosine similarities mapped to [0, 1] (PKT's conditional probabilities)."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)  # the authors' normalisation, eps added to the norm
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


class PKT(nn.Module):
    """Probabilistic knowledge transfer: KL between the two models' conditional probability kernels.

    The divergence is averaged over all N^2 entries of the kernel, as in the authors' code; the published
    weight (30000) belongs to that form."""

    def __init__(self, ctx: KDContext, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for fs, ft in zip(s.feats, t.feats, strict=True):
            ps, pt = _cosine_probabilities(flat(fs), self.eps), _cosine_probabilities(flat(ft), self.eps)
            loss = loss + (pt * torch.log((pt + self.eps) / (ps + self.eps))).mean()
        return loss


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances between rows, divided by their mean over the pairs i != j (RKD distance potential).

    The matrix-multiply path of `torch.cdist` (taken above 25 rows) leaves non-zero self-distances from
    cancellation; the difference path is exact, gives a zero diagonal and a zero gradient at zero distance."""
    d = torch.cdist(e.unsqueeze(0), e.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


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
                dt, at = pairwise_distances(et), _angles(et)
            loss = loss + self.distance_weight * F.smooth_l1_loss(pairwise_distances(es), dt)
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(es), at)
        return loss


CRD_OBJECTIVES = ("nce", "infonce")


class CRD(nn.Module):
    """Contrastive representation distillation: a student embedding must tell its teacher embedding apart from
    `nce_k` negatives drawn from a memory bank of past embeddings (and vice versa).

    `objective=nce` is the paper's (and the authors' RepDistiller code): a binary classifier between the data and
    a uniform noise distribution over the N samples, on exp(score / T) / Z, with Z estimated once from the
    first batch and kept (a buffer, so checkpointed). `objective=infonce` is a softmax over the k + 1
    candidates, as in the authors' CMC code with `--softmax`."""

    def __init__(
        self,
        ctx: KDContext,
        feat_dim: int = 128,
        nce_k: int = 4096,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        objective: str = "nce",
    ) -> None:
        super().__init__()
        if objective not in CRD_OBJECTIVES:
            raise ValueError(f"crd objective={objective}: expected one of {', '.join(CRD_OBJECTIVES)}")
        s_dim, t_dim = (int(torch.Size(x[0]).numel()) for x in (ctx.student_shapes, ctx.teacher_shapes))
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)
        self.k, self.temperature, self.momentum = min(nce_k, ctx.num_samples - 1), nce_t, nce_m
        self.objective, self.eps = objective, 1e-7  # eps: the reference's, in the NCE denominators
        # memory banks of past embeddings, one row per training sample; saved in the checkpoint
        self.register_buffer("memory_s", F.normalize(torch.randn(ctx.num_samples, feat_dim), dim=1))
        self.register_buffer("memory_t", F.normalize(torch.randn(ctx.num_samples, feat_dim), dim=1))
        # NCE normalisation constants (student anchor, teacher anchor); negative until the first batch sets them
        self.register_buffer("z", torch.full((2,), -1.0))

    def sample_negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """`nce_k` sample indices per anchor, uniform over the training set (the NCE noise distribution)."""
        return torch.randint(0, self.memory_s.shape[0], (len(idx), self.k), device=idx.device)

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        vs = F.normalize(self.embed_s(flat(s.feats[0])), dim=1)
        vt = F.normalize(self.embed_t(flat(t.feats[0])), dim=1)
        candidates = torch.cat([idx[:, None], self.sample_negatives(idx)], dim=1)  # column 0 is the positive
        scores_s = torch.bmm(self.memory_t[candidates], vs.unsqueeze(2)).squeeze(2) / self.temperature
        scores_t = torch.bmm(self.memory_s[candidates], vt.unsqueeze(2)).squeeze(2) / self.temperature
        if self.objective == "infonce":
            target = torch.zeros(len(idx), dtype=torch.long, device=idx.device)
            loss = F.cross_entropy(scores_s, target) + F.cross_entropy(scores_t, target)
        else:
            loss = self._nce(scores_s, scores_t)
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.memory_s[idx] = F.normalize(self.memory_s[idx] * m + vs.detach() * (1 - m), dim=1)
                self.memory_t[idx] = F.normalize(self.memory_t[idx] * m + vt.detach() * (1 - m), dim=1)
        return loss

    def _nce(self, scores_s: torch.Tensor, scores_t: torch.Tensor) -> torch.Tensor:
        n = self.memory_s.shape[0]
        # at least float32: under 16-bit autocast exp(score / T) would carry 3 significant digits
        exp_s, exp_t = (x.to(torch.promote_types(x.dtype, torch.float32)).exp() for x in (scores_s, scores_t))
        with torch.no_grad():  # Z = N * E[exp(score / T)] over the first batch, then fixed (no host sync)
            first = torch.stack([exp_s.mean(), exp_t.mean()]) * n
            self.z.copy_(torch.where(self.z < 0, first, self.z))
        noise = self.k / n  # k * P_noise, P_noise = 1 / N
        loss = exp_s.new_zeros(())
        for p in (exp_s / self.z[0], exp_t / self.z[1]):
            log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + self.eps))  # the positive is data
            log_d0 = torch.log(noise / (p[:, 1:] + noise + self.eps))  # each negative is noise
            loss = loss - (log_d1.sum() + log_d0.sum()) / len(p)
        return loss
