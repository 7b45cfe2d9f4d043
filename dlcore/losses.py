"""Losses as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l1(recon: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over every pixel of the batch."""
    return (recon - target).abs().mean()


def l2(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every pixel of the batch."""
    return (recon - target).pow(2).mean()


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) over the 2N views.

    z1, z2: (N, D) projections of two views of the same N images. Each of the 2N views is
    classified against the other 2N - 1 (self-similarity excluded); its positive is the other
    view of its image. Returns the mean over the 2N anchors.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N) cosine similarities over temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)  # (2N,): view i's positive is i + N (mod 2N)
    return F.cross_entropy(sim, positive)


def _standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-dimension batch standardisation of z (N, D), as the reference's BatchNorm1d(affine=False) in
    training mode: biased variance, eps inside the square root."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021; facebookresearch/barlowtwins ``main.py``).

    z1, z2: (N, D). C = bn(z1)^T bn(z2) / N is the (D, D) cross-correlation of the embeddings, each
    view standardised over the batch as BatchNorm1d(D, affine=False) does (eps 1e-5);
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.
    """
    n = len(z1)
    c = _standardize(z1).T @ _standardize(z2) / n  # (D, D)
    diag = torch.diagonal(c)
    invariance = (1 - diag).pow(2).sum()
    redundancy = c.pow(2).sum() - diag.pow(2).sum()
    return invariance + lambd * redundancy


RECONSTRUCTION = {"l1": l1, "l2": l2}


def reconstruction_loss(name: str):
    if name not in RECONSTRUCTION:
        raise ValueError(f"unknown reconstruction loss '{name}'; known: {sorted(RECONSTRUCTION)}")
    return RECONSTRUCTION[name]
