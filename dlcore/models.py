"""Encoders, decoders and heads as small builders; every encoder carries ``out_dim``.

Encoder, decoder and head are separate modules so that any encoder can be frozen, reused
under a fresh head, or paired with a new decoder (E2's classifier decoding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _with_dim(module: nn.Module, out_dim: int) -> nn.Module:
    module.out_dim = out_dim
    return module


def mlp_encoder(image_shape: tuple[int, int, int], hidden: tuple[int, ...] = (512, 128), latent_dim: int = 128) -> nn.Module:
    """E5's encoder: 784 -> 512 -> 128 -> 128, ReLU after all but the last layer."""
    dims = [math.prod(image_shape), *hidden, latent_dim]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return _with_dim(nn.Sequential(*layers), latent_dim)


def mlp_decoder(
    image_shape: tuple[int, int, int], hidden: tuple[int, ...] = (512, 128), latent_dim: int = 128, sigmoid: bool = False
) -> nn.Module:
    """The mirror of ``mlp_encoder``: 128 -> 128 -> 512 -> 784, no activation at the end (E5) unless ``sigmoid``."""
    dims = [latent_dim, *reversed(hidden), math.prod(image_shape)]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    if sigmoid:
        layers.append(nn.Sigmoid())
    layers.append(nn.Unflatten(1, image_shape))
    return nn.Sequential(*layers)


class _FlattenKeepingFormat(torch.autograd.Function):
    """``x.flatten(1)`` whose gradient comes back in ``x``'s memory format. nn.Flatten hands a
    channels-last activation an NCHW gradient, and the ReLU before it then runs its backward on two
    layouts at once, ~10x slower than on one (measured on the 2-core CPU: 4.6 ms against 0.4 ms for a
    128x32x14x14 batch); one copy of the gradient into the activation's layout costs less."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.flatten(1)  # a copy: the layouts differ

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


class Flatten(nn.Flatten):
    """nn.Flatten(start_dim=1) (same computation, no parameters) for conv features that may be channels-last."""

    def __init__(self):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return _FlattenKeepingFormat.apply(x)
        return x.flatten(1)


def _conv_block(a: int, b: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))


def _coarsest(image_shape: tuple[int, int, int], channels: tuple[int, ...]) -> tuple[int, int, int]:
    size = image_shape[1]
    for _ in channels:
        size = (size + 1) // 2
    return channels[-1], size, size


def conv_encoder(
    image_shape: tuple[int, int, int],
    channels: tuple[int, ...] = (32, 64),
    latent_dim: int = 12,
    fc_hidden: int = 0,
) -> nn.Module:
    """Stride-2 conv blocks down to the coarsest grid, then FC layer(s) to ``latent_dim`` (E1, E2).

    MNIST with channels (32, 64): 28 -> 14 -> 7, then 64*7*7 -> [fc_hidden ->] d.
    """
    layers: list[nn.Module] = []
    prev = image_shape[0]
    for c in channels:
        layers.append(_conv_block(prev, c, 2))
        prev = c
    flat = math.prod(_coarsest(image_shape, channels))
    layers.append(Flatten())
    if fc_hidden:
        layers += [nn.Linear(flat, fc_hidden), nn.ReLU(inplace=True)]
        flat = fc_hidden
    layers.append(nn.Linear(flat, latent_dim))
    return _with_dim(nn.Sequential(*layers), latent_dim)


def conv_features(encoder: nn.Module) -> nn.Module:
    """``encoder`` (a ``conv_encoder``, weights and all) cut after its flatten: the conv feature map
    its FC layers read, as a vector: where a linear probe of a small CNN reads most (E3's CPU profile)."""
    cut = next((i for i, m in enumerate(encoder) if isinstance(m, Flatten)), None) if isinstance(encoder, nn.Sequential) else None
    if cut is None:
        raise ValueError("features 'conv' needs a conv encoder (conv blocks, a flatten, FC layers)")
    fc = next(m for m in encoder[cut + 1 :] if isinstance(m, nn.Linear))
    return _with_dim(encoder[: cut + 1], fc.in_features)


def conv_decoder(
    image_shape: tuple[int, int, int],
    channels: tuple[int, ...] = (32, 64),
    latent_dim: int = 12,
    fc_hidden: int = 0,
    sigmoid: bool = True,
) -> nn.Module:
    """The mirror of ``conv_encoder``: FC to the coarsest grid, stride-2 transposed convs up.

    A sigmoid output suits [0, 1] pixels: with a linear output and L1 loss the decoder sits for
    hundreds of steps at the all-black image (MNIST's median pixel).
    """
    c, s, _ = _coarsest(image_shape, channels)
    layers: list[nn.Module] = []
    prev = latent_dim
    if fc_hidden:
        layers += [nn.Linear(latent_dim, fc_hidden), nn.ReLU(inplace=True)]
        prev = fc_hidden
    layers += [nn.Linear(prev, c * s * s), nn.ReLU(inplace=True), nn.Unflatten(1, (c, s, s))]
    sizes = [image_shape[1]]
    for _ in channels:
        sizes.append((sizes[-1] + 1) // 2)
    # Going up from size[i+1] to size[i]; output_padding makes odd sizes (7 -> 14 -> 28) exact.
    ups = list(reversed(channels))
    for i, (a, b) in enumerate(zip(ups, ups[1:] + [image_shape[0]])):
        target = sizes[len(channels) - 1 - i]
        src = sizes[len(channels) - i]
        out_pad = target - (2 * src - 1)
        last = i == len(ups) - 1
        layers.append(nn.ConvTranspose2d(a, b, 3, 2, 1, output_padding=out_pad, bias=last))
        if not last:
            layers += [nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block (He et al. 2016)."""

    def __init__(self, a: int, b: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(a, b, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.conv2 = nn.Conv2d(b, b, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(b)
        self.shortcut = nn.Sequential()
        if stride != 1 or a != b:
            self.shortcut = nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_cifar(image_shape: tuple[int, int, int] = (3, 32, 32), width: int = 64) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); outputs 8 * width features.

    Hand-written rather than torchvision's because torchvision fixes BasicBlock widths, and smoke
    runs on a CPU need a narrow one (width 16: ~1/16 of the FLOPs).
    """
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [nn.Conv2d(image_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    prev = width
    for i, w in enumerate(widths):
        layers += [BasicBlock(prev, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        prev = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _with_dim(nn.Sequential(*layers), widths[-1])


def projection_head(in_dim: int, out_dim: int = 128, hidden: int = 2048) -> nn.Module:
    """SimCLR/Barlow projector: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def mlp_head(in_dim: int, num_classes: int, hidden: int = 128) -> nn.Module:
    """Classifier head: two layers, or one linear layer (a linear probe) when ``hidden`` is 0."""
    if not hidden:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class Siamese(nn.Module):
    """Encoder + projection head; forward returns (features, projection)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)  # (B, F)
        return h, self.projector(h)  # (B, F), (B, P)


ENCODERS = {"mlp": mlp_encoder, "conv": conv_encoder, "resnet18": resnet18_cifar}
DECODERS = {"mlp": mlp_decoder, "conv": conv_decoder}


def _lookup(registry: dict, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}'; known: {sorted(registry)}")
    return registry[name]


def build_encoder(name: str, image_shape: tuple[int, int, int], **kwargs) -> nn.Module:
    return _lookup(ENCODERS, "encoder", name)(image_shape, **kwargs)


def build_decoder(name: str, image_shape: tuple[int, int, int], **kwargs) -> nn.Module:
    return _lookup(DECODERS, "decoder", name)(image_shape, **kwargs)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_state(path: str, device: torch.device | str = "cpu") -> dict:
    """A plain state dict saved by ``torch.save``; never unpickles code."""
    return torch.load(path, map_location=device, weights_only=True)
