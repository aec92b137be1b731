"""Each KD method's maths against a small case computed by hand (or an exact invariance of the method)."""

import math

import pytest
import torch
from torch import nn

from modrun.core.registry import KD_METHODS
from modrun.methods.distill.base import KDContext, Outputs

Y = torch.tensor([0])
IDX = torch.tensor([0])


def ctx(s_shapes=(), t_shapes=(), num_samples=8) -> KDContext:
    return KDContext([torch.Size(s) for s in s_shapes], [torch.Size(t) for t in t_shapes], 3, num_samples)


def method(name, c=None, **kw):
    return KD_METHODS.get(name)(c or ctx(), **kw)


def test_kd_is_kl_of_softened_distributions():
    s, t = Outputs(torch.tensor([[0.0, 0.0]])), Outputs(torch.tensor([[0.0, math.log(3.0)]]))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # p_t = (1/4, 3/4), p_s = (1/2, 1/2)
    assert method("kd", temperature=1.0)(s, t, Y, IDX).item() == pytest.approx(expected, rel=1e-5)
    # at T=2 the logits are halved and the KL is multiplied by T^2 = 4
    t2 = Outputs(torch.tensor([[0.0, 2 * math.log(3.0)]]))
    assert method("kd", temperature=2.0)(s, t2, Y, IDX).item() == pytest.approx(4 * expected, rel=1e-5)


def test_dkd_splits_target_and_non_target():
    s, t = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[math.log(2.0), 0.0, math.log(3.0)]])
    # teacher probs (2, 1, 3)/6; student (1, 1, 1)/3; target class 0
    tckd = (2 / 6) * math.log((2 / 6) / (1 / 3)) + (4 / 6) * math.log((4 / 6) / (2 / 3))
    nckd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # non-target: (1, 3)/4 vs (1, 1)/2
    m = method("dkd", temperature=1.0, alpha=2.0, beta=3.0)
    assert m(Outputs(s), Outputs(t), Y, IDX).item() == pytest.approx(2 * tckd + 3 * nckd, rel=1e-4)


def test_dist_is_one_minus_pearson():
    s = Outputs(torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])))
    assert method("dist", temperature=1.0)(s, s, Y, IDX).item() == pytest.approx(0.0, abs=1e-6)
    t = Outputs(torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])))
    ps, pt = torch.softmax(s.logits, 1), torch.softmax(t.logits, 1)
    inter = sum(1 - torch.corrcoef(torch.stack([ps[i], pt[i]]))[0, 1].item() for i in range(2)) / 2
    intra = sum(1 - torch.corrcoef(torch.stack([ps[:, j], pt[:, j]]))[0, 1].item() for j in range(3)) / 3
    got = method("dist", temperature=1.0, beta=1.0, gamma=1.0)(s, t, Y, IDX).item()
    assert got == pytest.approx(inter + intra, rel=1e-4)


def test_logit_std_ignores_scale_and_shift_of_logits():
    s, t = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[0.5, 3.0, 1.0]])
    m = method("logit_std", temperature=2.0)
    base = m(Outputs(s), Outputs(t), Y, IDX).item()
    assert m(Outputs(5 * s + 3), Outputs(t / 7), Y, IDX).item() == pytest.approx(base, rel=1e-4)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    assert base == pytest.approx(method("kd", temperature=2.0)(Outputs(z(s)), Outputs(z(t)), Y, IDX).item(), 1e-4)


def test_fitnet_regresses_through_adapter():
    m = method("fitnet", ctx([(2, 2, 2)], [(2, 2, 2)]))
    conv, bn = m.adapters[0]
    conv.weight.data = torch.eye(2).view(2, 2, 1, 1)
    m.eval()  # BN with fresh statistics is the identity (up to eps)
    fs, ft = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    got = m(Outputs(torch.zeros(1, 3), [fs]), Outputs(torch.zeros(1, 3), [ft]), Y, IDX).item()
    assert got == pytest.approx(1.0 / (1 + bn.eps) ** 1, rel=1e-4)
    assert sum(p.numel() for p in m.parameters()) == 4 + 4  # 1x1 conv 2->2 and BN affine


def test_at_compares_normalised_attention_maps():
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    ft = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    got = method("at", ctx([(1, 2, 2)], [(1, 2, 2)]))(
        Outputs(torch.zeros(1, 3), [fs]), Outputs(torch.zeros(1, 3), [ft]), Y, IDX
    )
    assert got.item() == pytest.approx(0.5)  # maps e1 and e2: squared difference 2, mean over 4


def test_sp_compares_row_normalised_gram_matrices():
    fs, ft = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = method("sp")(Outputs(torch.zeros(2, 3), [fs]), Outputs(torch.zeros(2, 3), [ft]), Y, IDX).item()
    r = 1 / math.sqrt(2)  # G_s = I; G_t = all ones, rows normalised to (r, r)
    assert got == pytest.approx((2 * (1 - r) ** 2 + 2 * r**2) / 4, rel=1e-5)


def test_vid_is_gaussian_negative_log_likelihood():
    m = method("vid", ctx([(3,)], [(3,)]), init_pred_var=2.0)
    m.regressors[0] = nn.Identity()
    fs, ft = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    var = 2.0  # softplus(log_scale) + eps starts at init_pred_var
    expected = sum(0.5 * ((a - b) ** 2 / var + math.log(var)) for a, b in zip([1, 2, 3], [1, 1, 1], strict=True)) / 3
    got = m(Outputs(torch.zeros(1, 3), [fs]), Outputs(torch.zeros(1, 3), [ft]), Y, IDX).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_reviewkd_hierarchical_context_loss_and_gradients():
    from modrun.methods.distill.methods_feature import hcl

    fs, ft = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert hcl(fs, ft).item() == pytest.approx(1.0)  # full-res MSE 1, pooled 1x1 MSE 1 at weight 1/2: 1.5 / 1.5
    ft2 = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])  # full-res MSE (1 + 1 + 1 + 1) / 4 = 1; pooled (1 - 0.5)^2
    assert hcl(fs, ft2).item() == pytest.approx((1.0 + 0.5 * 0.25) / 1.5)
    m = method("reviewkd", ctx([(4, 8, 8), (8, 4, 4)], [(6, 8, 8), (12, 4, 4)]), mid_channels=5)
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    loss = m(
        Outputs(torch.zeros(2, 3), s),
        Outputs(torch.zeros(2, 3), [torch.randn(2, 6, 8, 8), torch.randn(2, 12, 4, 4)]),
        Y,
        IDX,
    )
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)


def test_pkt_zero_for_same_kernel_and_hand_case():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert method("pkt")(
        Outputs(torch.zeros(2, 3), [f]), Outputs(torch.zeros(2, 3), [f]), Y, IDX
    ).item() == pytest.approx(0, abs=1e-6)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # student kernel rows (1, 1/2)/(3/2) = (2/3, 1/3); teacher rows (1, 1)/2; mean over the 2 x 2 entries
    expected = 2 * (0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))) / 4
    got = method("pkt")(Outputs(torch.zeros(2, 3), [f]), Outputs(torch.zeros(2, 3), [ft]), Y, IDX).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_rkd_is_invariant_to_scale_and_zero_for_same_geometry():
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    m = method("rkd")
    assert m(Outputs(torch.zeros(3, 3), [e]), Outputs(torch.zeros(3, 3), [3 * e + 1]), Y, IDX).item() == pytest.approx(
        0, abs=1e-6
    )
    squashed = e * torch.tensor([1.0, 0.1])
    assert m(Outputs(torch.zeros(3, 3), [squashed]), Outputs(torch.zeros(3, 3), [e]), Y, IDX).item() > 0.1


def test_crd_infonce_against_memory_bank():
    m = method("crd", ctx([(2,)], [(2,)], num_samples=3), feat_dim=2, nce_k=2, nce_t=1.0, objective="infonce")
    for lin in (m.embed_s, m.embed_t):
        lin.weight.data, lin.bias.data = torch.eye(2), torch.zeros(2)
    m.memory_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    m.memory_t.copy_(m.memory_s)
    m.eval()  # no memory update
    f = torch.tensor([[1.0, 0.0]])
    loss = m(Outputs(torch.zeros(1, 3), [f]), Outputs(torch.zeros(1, 3), [f]), Y, torch.tensor([0])).item()
    # positive similarity 1, the two negatives (rows 1 or 2, or 0 again) have similarity 0 or 1: bounded both ways
    one = -math.log(math.e / (math.e + 2))  # both negatives orthogonal
    assert 2 * one - 1e-5 <= loss <= 2 * -math.log(math.e / (3 * math.e)) + 1e-5
    m.train()
    torch.manual_seed(0)
    m(Outputs(torch.zeros(1, 3), [torch.tensor([[0.0, 1.0]])]), Outputs(torch.zeros(1, 3), [f]), Y, torch.tensor([0]))
    assert m.memory_s[0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)])  # momentum 0.5 update


def test_every_method_is_listed_with_paper():
    names = dict(KD_METHODS.summaries())
    assert len(names) >= 12
    for n in ("kd", "dkd", "dist", "logit_std", "fitnet", "at", "sp", "pkt", "rkd", "vid", "crd", "reviewkd"):
        assert n in names and any(ch.isdigit() for ch in names[n]), n  # the description cites the paper's year
