"""Each loss against a straightforward reference, its symmetry, and that it falls under gradient steps."""

import math

import pytest
import torch

from dlcore import losses


def nt_xent_reference(z1, z2, t):
    """Loop form of SimCLR's loss: for each anchor, -log softmax of its positive among the other 2N-1."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -(float(z[i] @ z[j]) / t - math.log(denom))
    return total / n2


def barlow_reference(z1, z2, lambd):
    """Loop form with the biased batch variance and eps inside the root, as BatchNorm1d standardises."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / ((z1 - z1.mean(0)).pow(2).mean(0) + 1e-5).sqrt()
    b = (z2 - z2.mean(0)) / ((z2 - z2.mean(0)).pow(2).mean(0) + 1e-5).sqrt()
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = float(sum(a[k, i] * b[k, j] for k in range(n))) / n
            total += (1 - c) ** 2 if i == j else lambd * c**2
    return total


@pytest.fixture
def views():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)


def test_reconstruction_losses_match_definitions():
    a, b = torch.tensor([[0.0, 1.0], [2.0, 4.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert losses.l1(a, b).item() == pytest.approx((1 + 0 + 2 + 4) / 4)
    assert losses.l2(a, b).item() == pytest.approx((1 + 0 + 4 + 16) / 4)
    with pytest.raises(ValueError, match="known"):
        losses.reconstruction_loss("huber")


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(views, t):
    z1, z2 = views
    assert losses.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-9)


def test_nt_xent_is_symmetric_and_low_for_matching_views(views):
    z1, z2 = views
    assert losses.nt_xent(z1, z2).item() == pytest.approx(losses.nt_xent(z2, z1).item(), rel=1e-12)
    assert losses.nt_xent(z1, z1, 0.1) < losses.nt_xent(z1, z2, 0.1)


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_matches_loop_reference(views, lambd):
    z1, z2 = views
    assert losses.barlow_twins(z1, z2, lambd).item() == pytest.approx(barlow_reference(z1, z2, lambd), rel=1e-9)


def barlow_batchnorm_reference(z1, z2, lambd):
    """facebookresearch/barlowtwins: c = bn(z1).T @ bn(z2) / N with BatchNorm1d(D, affine=False) in training mode."""
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False, dtype=z1.dtype).train()
    c = bn(z1).T @ bn(z2) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # small spreads: where eps placement and the biased variance matter
def test_barlow_matches_batchnorm_reference_at_batch_8(scale):
    g = torch.Generator().manual_seed(1)
    z1, z2 = scale * torch.randn(8, 16, generator=g), scale * torch.randn(8, 16, generator=g)
    expected = barlow_batchnorm_reference(z1, z2, 5e-3).item()
    assert losses.barlow_twins(z1, z2, 5e-3).item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_barlow_is_symmetric(views):
    z1, z2 = views
    assert losses.barlow_twins(z1, z2).item() == pytest.approx(losses.barlow_twins(z2, z1).item(), rel=1e-12)


@pytest.mark.parametrize("loss", [lambda a, b: losses.nt_xent(a, b, 0.5), lambda a, b: losses.barlow_twins(a, b, 5e-3)])
def test_ssl_losses_fall_under_gradient_steps(loss):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    noise = lambda: x + 0.1 * torch.randn_like(x)  # two "views"
    first = loss(net(noise()), net(noise())).item()
    for _ in range(30):
        opt.zero_grad()
        value = loss(net(noise()), net(noise()))
        value.backward()
        opt.step()
    assert value.item() < 0.9 * first
