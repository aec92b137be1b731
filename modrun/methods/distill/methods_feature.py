"""KD methods over intermediate features: FitNet, attention transfer, similarity preserving, VID, ReviewKD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modrun.methods.distill.base import KDContext, Outputs, adapter, flat, match_spatial


def _spatial(shape: torch.Size) -> tuple[int, int] | None:
    return tuple(shape[-2:]) if len(shape) == 3 else None


class FitNet(nn.Module):
    """Regress teacher features from student features through a trainable 1x1 adapter (hints)."""

    bare_at_equal_shapes = False  # the paper's regressor is there even where the shapes already agree

    def __init__(self, ctx: KDContext) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.Identity() if self.bare_at_equal_shapes and s == t else adapter(s, t)
            for s, t in zip(ctx.student_shapes, ctx.teacher_shapes, strict=True)
        )
        self.sizes = [_spatial(t) for t in ctx.teacher_shapes]

    def distance(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target)

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for a, fs, ft, size in zip(self.adapters, s.feats, t.feats, self.sizes, strict=True):
            out = a(fs)
            out = match_spatial(out, size) if size else out
            loss = loss + self.distance(out, ft.reshape(out.shape))
        return loss


class CosineHidden(FitNet):
    """Align the direction of hidden states: 1 - cos(r(h_s), h_t) per token (per position of a map, per sample
    of a vector), the cosine embedding loss of DistilBERT (Sanh et al. 2019); r is a trainable `adapter` only
    where the widths differ (DistilBERT's student has the teacher's width)."""

    bare_at_equal_shapes = True

    def distance(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = 1 if out.dim() == 4 else -1  # maps: channels at each position; tokens: the last dim
        return (1 - F.cosine_similarity(out, target, dim=channels, eps=1e-8)).mean()


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """Spatial attention: mean over channels of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


class AT(nn.Module):
    """Attention transfer: match the students' spatial attention maps to the teacher's."""

    def __init__(self, ctx: KDContext, p: float = 2.0) -> None:
        super().__init__()
        if any(len(x) != 3 for x in [*ctx.student_shapes, *ctx.teacher_shapes]):
            raise ValueError("at needs feature maps (C, H, W) at its layers")
        self.p = p
        self.sizes = [_spatial(t) for t in ctx.teacher_shapes]

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for fs, ft, size in zip(s.feats, t.feats, self.sizes, strict=True):
            a_s = attention_map(match_spatial(fs, size), self.p)
            loss = loss + (a_s - attention_map(ft, self.p)).pow(2).mean()
        return loss


class SP(nn.Module):
    """Similarity preserving: pairs of inputs similar for the teacher should be similar for the student."""

    def __init__(self, ctx: KDContext) -> None:
        super().__init__()

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for fs, ft in zip(s.feats, t.feats, strict=True):
            gs, gt = F.normalize(flat(fs) @ flat(fs).t(), dim=1), F.normalize(flat(ft) @ flat(ft).t(), dim=1)
            loss = loss + (gs - gt).pow(2).sum() / fs.shape[0] ** 2
        return loss


def pool_to_common(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps down to the other's size (VID's dimension match)."""
    if fs.dim() != 4 or ft.dim() != 4:
        return fs, ft
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    pool = lambda f: f if tuple(f.shape[-2:]) == size else F.adaptive_avg_pool2d(f, size)  # noqa: E731
    return pool(fs), pool(ft)


class VID(nn.Module):
    """Maximise a Gaussian likelihood of teacher features given student features (learned mean and variance).

    As in the authors' code: maps are pooled to a common size first, then a bias-free 1x1 conv regressor
    predicts the mean; one variance per teacher channel; the negative log-likelihood is averaged over all
    elements."""

    def __init__(self, ctx: KDContext, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.regressors, self.log_scales = nn.ModuleList(), nn.ParameterList()
        for s_shape, t_shape in zip(ctx.student_shapes, ctx.teacher_shapes, strict=True):
            if len(s_shape) == 3 and len(t_shape) == 3:
                c_in, c_out = s_shape[0], t_shape[0]
                self.regressors.append(
                    nn.Sequential(
                        nn.Conv2d(c_in, c_out, 1, bias=False),
                        nn.ReLU(),
                        nn.Conv2d(c_out, c_out, 1, bias=False),
                        nn.ReLU(),
                        nn.Conv2d(c_out, c_out, 1, bias=False),
                    )
                )
                shape = (1, c_out, 1, 1)
            else:
                self.regressors.append(adapter(s_shape, t_shape))
                tokens = len(s_shape) == 2 and len(t_shape) == 2 and s_shape[0] == t_shape[0]
                # hidden states (T, C): one variance per channel, shared by the tokens (as per channel of a map)
                shape = (1, 1, t_shape[1]) if tokens else (1, int(torch.Size(t_shape).numel()))
            # softplus(log_scale) + eps starts at init_pred_var
            self.log_scales.append(nn.Parameter(torch.full(shape, math.log(math.exp(init_pred_var - eps) - 1.0))))

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = s.logits.new_zeros(())
        for reg, log_scale, fs, ft in zip(self.regressors, self.log_scales, s.feats, t.feats, strict=True):
            fs, ft = pool_to_common(fs, ft)
            mean = reg(fs)
            var = F.softplus(log_scale) + self.eps
            target = ft.reshape(mean.shape)
            loss = loss + (0.5 * ((mean - target).pow(2) / var + var.log())).mean()
        return loss


class ABF(nn.Module):
    """Attention-based fusion: merge a level's student feature with the residual coming from deeper levels."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.conv1[0], self.conv2[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the authors' initialisation

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output at the teacher's `size`, and the fused feature passed on to the next (shallower) level."""
        x = self.conv1(x)
        if self.att is not None and residual is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(size):  # resized before the 3x3 conv, as in the original
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv2(x), x


def hcl(fs: torch.Tensor, ft: torch.Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss: MSE at full resolution plus pooled pyramids, halving the weight each level.

    A level is used when it is smaller than the map's height, as in the original."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for level in levels:
        if level >= fs.shape[-2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


class ReviewKD(nn.Module):
    """Knowledge review: deeper student features, fused top-down by ABF modules, match shallower teacher ones."""

    def __init__(self, ctx: KDContext, mid_channels: int = 64) -> None:
        super().__init__()
        if any(len(x) != 3 for x in [*ctx.student_shapes, *ctx.teacher_shapes]):
            raise ValueError("reviewkd needs feature maps (C, H, W) at its layers")
        n = len(ctx.student_shapes)
        # built deepest first: the deepest level has nothing to fuse with
        self.abfs = nn.ModuleList(
            ABF(ctx.student_shapes[i][0], mid_channels, ctx.teacher_shapes[i][0], fuse=i < n - 1)
            for i in reversed(range(n))
        )
        self.sizes = [tuple(t[-2:]) for t in ctx.teacher_shapes]

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        outs, residual = [], None
        for abf, feat, size in zip(self.abfs, reversed(s.feats), reversed(self.sizes), strict=True):
            out, residual = abf(feat, residual, size)
            outs.insert(0, out)
        return sum(hcl(o, ft) for o, ft in zip(outs, t.feats, strict=True))
