"""Feature KD methods against independent implementations of their papers' formulas (the authors' code where
the published weights belong to it), float64, batch 16 and 128. Methods with trainable modules (fitnet, vid,
reviewkd) have their parameters copied into the reference, which applies them with plain tensor algebra.
Also: the warm-up of a term (DKD, ReviewKD) through the distillation objective."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from modrun.core.registry import KD_METHODS
from modrun.methods.distill.base import KDContext, Outputs

BATCHES = [16, 128]
C = 10
RTOL = 1e-9


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def build(name: str, s_shapes, t_shapes, **kw) -> nn.Module:
    c = KDContext([torch.Size(s) for s in s_shapes], [torch.Size(t) for t in t_shapes], C, 300)
    return KD_METHODS.get(name)(c, **kw).double()


def call(m: nn.Module, s_feats, t_feats) -> float:
    b = len(s_feats[0])
    logits, y = torch.zeros(b, C, dtype=torch.float64), torch.zeros(b, dtype=torch.long)
    return m(Outputs(logits, list(s_feats)), Outputs(logits, list(t_feats)), y, torch.arange(b)).item()


def conv1x1(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", w.detach()[:, :, 0, 0], x)


def batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode BN: batch mean and biased variance per channel, then the affine map."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    gamma, beta = bn.weight.detach().view(1, -1, 1, 1), bn.bias.detach().view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * gamma + beta


def randomise(m: nn.Module, seed: int) -> None:
    """Random values for every parameter (BN affine too), so the copy into the reference is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("b", BATCHES)
def test_fitnet_is_hint_mse_through_the_adapter(b):
    m = build("fitnet", [(4, 6, 6)], [(8, 6, 6)])
    randomise(m, 1)
    fs, ft = rand(2, b, 4, 6, 6), rand(3, b, 8, 6, 6)
    conv, bn = m.adapters[0]
    # Romero et al.: || u_h - r(v_g) ||^2; mean over all elements (nn.MSELoss in the code the weight 100 is for)
    ref = ((batch_norm(conv1x1(conv.weight, fs), bn) - ft) ** 2).mean().item()
    assert call(m.train(), [fs], [ft]) == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("b", BATCHES)
def test_at_is_normalised_attention_map_distance(b):
    fs, ft = rand(4, b, 4, 6, 5), rand(5, b, 8, 6, 5)

    def q(f: torch.Tensor, i: int) -> list[float]:  # Q = sum_c |A_c|^2, flattened, l2-normalised (mean_c in code)
        a = [sum(f[i, c, h, w].item() ** 2 for c in range(f.shape[1])) / f.shape[1] for h in range(6) for w in range(5)]
        norm = math.sqrt(sum(v * v for v in a))
        return [v / norm for v in a]

    # the authors' code: mean over batch and map elements of the squared difference (weight 1000 is for it)
    ref = sum(sum((x - z) ** 2 for x, z in zip(q(fs, i), q(ft, i), strict=True)) for i in range(b)) / (b * 30)
    assert call(build("at", [(4, 6, 5)], [(8, 6, 5)]), [fs], [ft]) == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("b", BATCHES)
def test_sp_is_frobenius_distance_of_row_normalised_grams(b):
    fs, ft = rand(6, b, 3, 2, 2), rand(7, b, 5, 2, 2)

    def gram(f: torch.Tensor) -> list[list[float]]:
        rows = [r.flatten().tolist() for r in f]
        g = [[sum(a * c for a, c in zip(u, v, strict=True)) for v in rows] for u in rows]
        return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in g]

    gs, gt = gram(fs), gram(ft)
    ref = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2  # Tung & Mori: 1/b^2 ||.||_F^2
    assert call(build("sp", [(3, 2, 2)], [(5, 2, 2)]), [fs], [ft]) == pytest.approx(ref, rel=RTOL)


def avg_pool(f: torch.Tensor, k: int) -> torch.Tensor:
    b, c, h, w = f.shape
    return f.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("s_hw", "t_hw"), [(8, 4), (4, 8), (4, 4)])
def test_vid_pools_then_regresses_without_biases(b, s_hw, t_hw):
    m = build("vid", [(4, s_hw, s_hw)], [(6, t_hw, t_hw)], init_pred_var=5.0, eps=1e-5)
    randomise(m, 8)
    convs = [layer for layer in m.regressors[0] if isinstance(layer, nn.Conv2d)]
    assert len(convs) == 3 and all(conv.bias is None for conv in convs)  # the paper's regressor has no biases
    fs, ft = rand(9, b, 4, s_hw, s_hw), rand(10, b, 6, t_hw, t_hw)
    # Ahn et al.: the larger map is average-pooled to the other's size *before* the regressor (authors' code)
    fs, ft = (avg_pool(fs, s_hw // t_hw), ft) if s_hw > t_hw else (fs, avg_pool(ft, t_hw // s_hw))
    mean = conv1x1(convs[2].weight, torch.relu(conv1x1(convs[1].weight, torch.relu(conv1x1(convs[0].weight, fs)))))
    var = torch.log(1 + torch.exp(m.log_scales[0].detach())) + 1e-5  # one variance per channel
    ref = (0.5 * ((mean - ft) ** 2 / var + torch.log(var))).mean().item()  # -log N(t; mu(s), var), mean
    assert call(m.train(), [rand(9, b, 4, s_hw, s_hw)], [rand(10, b, 6, t_hw, t_hw)]) == pytest.approx(ref, rel=RTOL)


def nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize: output (i, j) reads input (floor(i * h / H), floor(j * w / W))."""
    h, w = x.shape[-2:]
    rows = [math.floor(i * h / size[0]) for i in range(size[0])]
    cols = [math.floor(j * w / size[1]) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def hcl_ref(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Chen et al. 2021: MSE plus the pooled 4x4, 2x2, 1x1 pyramids smaller than the map's height, weights 1/2^k."""
    loss, total, weight = ((fs - ft) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level < fs.shape[2]:
            weight /= 2
            pool = lambda f: F.adaptive_avg_pool2d(f, (level, level))  # noqa: B023, E731
            loss, total = loss + weight * ((pool(fs) - pool(ft)) ** 2).mean(), total + weight
    return loss / total


@pytest.mark.parametrize("b", BATCHES)
def test_reviewkd_fuses_resizes_before_conv2_and_hcl_tests_height(b):
    # shallow level 8 x 2 (taller than wide: the 4x4 and 2x2 pyramid levels count), deep level upsampled 4x1 -> 8x2
    s_shapes, t_shapes = [(4, 8, 2), (8, 4, 1)], [(6, 8, 2), (12, 8, 2)]
    m = build("reviewkd", s_shapes, t_shapes, mid_channels=5).train()
    randomise(m, 11)
    fs = [rand(12, b, *s_shapes[0]), rand(13, b, *s_shapes[1])]
    ft = [rand(14, b, *t_shapes[0]), rand(15, b, *t_shapes[1])]
    deep, shallow = m.abfs  # built deepest first

    def abf(mod, x, residual, size):
        x = batch_norm(conv1x1(mod.conv1[0].weight, x), mod.conv1[1])
        if residual is not None:
            residual = nearest(residual, x.shape[-2:])
            att = torch.sigmoid(
                conv1x1(mod.att[0].weight, torch.cat([x, residual], 1)) + mod.att[0].bias.detach().view(1, -1, 1, 1)
            )
            x = x * att[:, :1] + residual * att[:, 1:]
        x = nearest(x, size)  # before the 3x3 conv
        return batch_norm(F.conv2d(x, mod.conv2[0].weight.detach(), padding=1), mod.conv2[1]), x

    out_deep, residual = abf(deep, fs[1], None, (8, 2))
    out_shallow, _ = abf(shallow, fs[0], residual, (8, 2))
    ref = (hcl_ref(out_shallow, ft[0]) + hcl_ref(out_deep, ft[1])).item()
    assert call(m, fs, ft) == pytest.approx(ref, rel=RTOL)


def distill_objective(tmp_path, terms: dict):
    from modrun.components.data.base import Data, Split
    from modrun.methods.distill.objective import DistillObjective

    torch.manual_seed(0)
    student, teacher = (nn.Sequential(nn.Flatten(), nn.Linear(12, C)) for _ in range(2))
    splits = [Split(y=torch.zeros(n, dtype=torch.long), x=torch.zeros(n, 3, 2, 2)) for n in (50, 10, 10)]
    data = Data(*splits, channels=3, image_size=2, num_classes=C)
    kd = OmegaConf.create({"task_weight": 1.0, "teacher_mode": "mean", "cache_teacher": False, "terms": terms})
    return DistillObjective(student, [teacher], kd, data, torch.device("cpu"), tmp_path)


@pytest.mark.parametrize("name", ["dkd", "kd"])
def test_term_warmup_scales_by_min_epoch_over_warmup(tmp_path, name):
    """mdistiller (DKD, ReviewKD): loss_kd * min(epoch / warmup, 1), epochs counted from 1."""
    term = {"name": name, "weight": 2.0, "warmup_epochs": 4, "temperature": 4.0}
    objective = distill_objective(tmp_path, {name: term})
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, C, (8,))
    for epoch, factor in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        objective.start_epoch(epoch)
        total, _, parts = objective.loss(x, y, torch.arange(8))
        expected = parts["task_loss"] + 2.0 * factor * parts[f"kd_{name}"]
        assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_warmup_defaults_20_in_the_cifar_recipe_and_0_on_digits(tmp_path):
    from conftest import cli

    (tmp_path / "data").mkdir()
    for args, want in [(["kd=dkd"], 0), (["experiment=kd_resnet56_resnet20", "kd=dkd"], 20)]:
        r = cli("validate", "distill", *args)
        assert r.code == 0, r.text
        assert f"warmup_epochs: {want}\n" in r.out
    r = cli("validate", "distill", "experiment=kd_resnet56_resnet20", "kd=[dkd,reviewkd]", "kd.warmup_epochs=3")
    assert r.code == 0 and r.out.count("warmup_epochs: 3\n") == 3  # kd-level and both terms


# --- hidden states of transformers: (T, C) token features ------------------------------------------------------


@pytest.mark.parametrize("b", BATCHES)
def test_fitnet_on_hidden_states_maps_every_token_alone(b):
    """The adapter is one linear map applied to each token (no mixing of positions): checked token by token."""
    m = build("fitnet", [(5, 4)], [(5, 6)])
    randomise(m, 2)
    fs, ft = rand(6, b, 5, 4), rand(7, b, 5, 6)
    lin = m.adapters[0][0]
    w, bias = lin.weight.detach(), lin.bias.detach()
    total = 0.0
    for i in range(b):
        for t in range(5):
            for o in range(6):
                r = sum(w[o, c].item() * fs[i, t, c].item() for c in range(4)) + bias[o].item()
                total += (r - ft[i, t, o].item()) ** 2
    assert call(m.train(), [fs], [ft]) == pytest.approx(total / (b * 5 * 6), rel=RTOL)
    assert sum(p.numel() for p in m.parameters()) == 4 * 6 + 6  # not a (T*C)^2 matrix


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("b", BATCHES)
def test_cosine_is_one_minus_the_cosine_of_each_tokens_hidden_states(b):
    """DistilBERT's cosine embedding loss: mean over tokens of 1 - cos(h_s, h_t); no adapter at equal widths."""
    m = build("cosine", [(5, 6)], [(5, 6)])
    assert not list(m.parameters())
    fs, ft = rand(8, b, 5, 6), rand(9, b, 5, 6)
    ref = sum(1 - _cos(fs[i, t].tolist(), ft[i, t].tolist()) for i in range(b) for t in range(5)) / (b * 5)
    assert call(m, [fs], [ft]) == pytest.approx(ref, rel=RTOL)
    # different widths: through the per-token linear adapter, then the same formula
    m = build("cosine", [(5, 4)], [(5, 6)])
    randomise(m, 3)
    lin = m.adapters[0][0]
    fs = rand(10, b, 5, 4)
    mapped = torch.einsum("oc,btc->bto", lin.weight.detach(), fs) + lin.bias.detach()
    ref = sum(1 - _cos(mapped[i, t].tolist(), ft[i, t].tolist()) for i in range(b) for t in range(5)) / (b * 5)
    assert call(m, [fs], [ft]) == pytest.approx(ref, rel=RTOL)
