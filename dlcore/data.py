"""Data sets held in memory as uint8 tensors, label budgets, and batch-wise augmentation.

Images live on the training device as one ``(N, C, H, W)`` uint8 tensor; a batch is
``images[idx]``. Every augmentation below works on a whole float batch at once, so the
training loop has no per-image Python and no DataLoader workers (cf. KellerJordan's airbench).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class DataError(ValueError):
    """A data set or a label budget that cannot be had; the message is one line for the user."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: Tensor  # (N, C, H, W) uint8
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per-channel, of the training images in [0, 1]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to_numpy(self) -> dict:
        """Plain arrays and metadata, cheap to share through Ray's object store (zero-copy reads)."""
        arrays = {k: getattr(self, k).cpu().numpy() for k in ("x_train", "y_train", "x_test", "y_test")}
        return {**arrays, "name": self.name, "num_classes": self.num_classes, "mean": self.mean, "std": self.std}

    @staticmethod
    def from_numpy(d: dict) -> "Dataset":
        with warnings.catch_warnings():  # read-only object-store arrays: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(d[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Dataset(name=d["name"], num_classes=d["num_classes"], mean=tuple(d["mean"]), std=tuple(d["std"]), **tensors)

    def to(self, device: torch.device | str) -> "Dataset":
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


# Torchvision classes for users with internet; the local .npz path is what tests run.
TORCHVISION = {"mnist": "MNIST", "cifar10": "CIFAR10"}


def default_data_dir() -> Path:
    """Where data sets live: DLSWEEP_DATA_DIR, else a per-user cache folder (~/.cache/dlsweep/data)."""
    if os.environ.get("DLSWEEP_DATA_DIR"):
        return Path(os.environ["DLSWEEP_DATA_DIR"]).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "dlsweep" / "data").resolve()


def fetch(name: str, folder: Path) -> Path:
    """Download ``name`` through torchvision into ``folder`` and keep it as ``<name>.npz`` there, the
    form every later run loads (needs internet; the only download path of dlsweep)."""
    if name not in TORCHVISION:
        raise DataError(f"no download for '{name}'; known: {sorted(TORCHVISION)}")
    folder.mkdir(parents=True, exist_ok=True)
    ds = _load_torchvision(name, folder / "torchvision", download=True)
    path = folder / f"{name}.npz"
    tmp = path.with_suffix(".tmp.npz")
    def hwc(x: Tensor) -> np.ndarray:  # the layout of the shared .npz files: (N, H, W) or (N, H, W, 3)
        x = x.permute(0, 2, 3, 1).numpy()
        return x[..., 0] if x.shape[-1] == 1 else x

    np.savez_compressed(tmp, x_train=hwc(ds.x_train), y_train=ds.y_train.numpy().astype(np.uint8),
                        x_test=hwc(ds.x_test), y_test=ds.y_test.numpy().astype(np.uint8))
    tmp.replace(path)
    return path


def _from_arrays(name: str, x_train, y_train, x_test, y_test) -> Dataset:
    def chw(x: np.ndarray) -> Tensor:
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim == 3:  # (N, H, W) grayscale
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):  # (N, H, W, C)
            x = x.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x))

    xtr, xte = chw(x_train), chw(x_test)
    ytr = torch.from_numpy(np.asarray(y_train).astype(np.int64))
    yte = torch.from_numpy(np.asarray(y_test).astype(np.int64))
    # Channel moments in chunks: a float64 copy of CIFAR-10 would take 1.2 GB.
    s1 = torch.zeros(xtr.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for chunk in xtr.split(4096):
        c = chunk.double().div_(255)
        s1 += c.sum((0, 2, 3))
        s2 += c.pow_(2).sum((0, 2, 3))
    count = xtr.numel() / xtr.shape[1]
    mean = s1 / count
    std = (s2 / count - mean**2).clamp(min=0).sqrt()
    return Dataset(
        name=name,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=int(max(ytr.max(), yte.max())) + 1,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def load_npz(path: str | Path, name: str | None = None) -> Dataset:
    """Load an ``.npz`` with uint8 ``x_train, y_train, x_test, y_test``."""
    path = Path(path)
    try:
        with np.load(path) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)}; expected x_train, y_train, x_test, y_test")
            arrays = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as e:
        if isinstance(e, DataError):
            raise
        reason = str(e).splitlines()[0] if str(e) else "empty or cut short"
        raise DataError(f"{path}: not a readable .npz, truncated or corrupt? ({type(e).__name__}: {reason})") from None
    return _from_arrays(name or path.stem, *arrays)


def _load_torchvision(name: str, root: Path, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name])
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=download)
    return _from_arrays(name, np.asarray(train.data), train.targets, np.asarray(test.data), test.targets)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Find a data set by name or path.

    Order: ``name`` as a path to an ``.npz``; ``<data_dir>/<name>.npz``; torchvision's own
    files under ``data_dir`` (downloaded there when ``download``). Raises DataError saying
    where it looked.
    """
    if name.endswith(".npz"):
        if Path(name).is_file():
            return load_npz(name)
        raise DataError(f"data set file {name} does not exist")
    looked = []
    if data_dir is not None:
        npz = Path(data_dir) / f"{name}.npz"
        if npz.is_file():
            return load_npz(npz, name)
        looked.append(str(npz))
    if name in TORCHVISION and data_dir is not None:
        try:
            return _load_torchvision(name, Path(data_dir), download)
        except Exception as e:  # torchvision raises RuntimeError, URLError, ... on missing files
            looked.append(f"torchvision {TORCHVISION[name]} under {data_dir} ({type(e).__name__})")
    elif name not in TORCHVISION:
        looked.append(f"no download for unknown data set (known: {sorted(TORCHVISION)})")
    where = "; ".join(looked) or "no data directory given"
    fetch_hint = f", or run `dlsweep data fetch {name}` (downloads it there)" if name in TORCHVISION else ""
    raise DataError(
        f"data set '{name}' not found (looked in: {where}); set DLSWEEP_DATA_DIR to a folder holding "
        f"{name}.npz{fetch_hint}"
    )


def select_classes(ds: Dataset, classes: list[int]) -> Dataset:
    """Keep only ``classes`` and relabel them 0..k-1 in the order given (E1: [3, 5] -> cat 0, dog 1)."""
    unknown = [c for c in classes if not 0 <= c < ds.num_classes]
    if unknown:
        raise DataError(f"classes {unknown} not in {ds.name} (labels 0..{ds.num_classes - 1})")
    if len(set(classes)) != len(classes):
        raise DataError(f"classes {classes} has repeats")
    lut = torch.full((ds.num_classes,), -1, dtype=torch.int64, device=ds.y_train.device)
    lut[torch.tensor(classes, device=lut.device)] = torch.arange(len(classes), device=lut.device)
    ytr, yte = lut[ds.y_train], lut[ds.y_test]
    keep_tr, keep_te = ytr >= 0, yte >= 0
    return replace(
        ds,
        x_train=ds.x_train[keep_tr],
        y_train=ytr[keep_tr],
        x_test=ds.x_test[keep_te],
        y_test=yte[keep_te],
        num_classes=len(classes),
    )


def validation_split(n: int, val_size: int | float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into (pool, val) indices; label budgets draw from the pool."""
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < n:
        raise DataError(f"validation size {val_size} must leave images on both sides of {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def budget_count(budget: int | float, pool: int, num_classes: int) -> int:
    """A label budget as a count: an int is a count, a float in (0, 1] a fraction of the pool."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise DataError(f"label fraction {budget} must be in (0, 1]")
        n = round(budget * pool)
    else:
        n = int(budget)
    if n > pool:
        raise DataError(f"label budget {budget} ({n} labels) exceeds the {pool} training images available")
    if n < num_classes:
        raise DataError(f"label budget {budget} ({n} labels) is smaller than the number of classes ({num_classes})")
    return n


def label_order(labels: Tensor, seed: int) -> Tensor:
    """A seeded order of positions in ``labels`` whose every prefix is stratified by class.

    The budget of n labels is ``order[:n]``, so budgets are nested for one seed. One image per
    class comes first; after that, the i-th image of a class of size n_c sits at (i + 0.5) / n_c,
    so every prefix holds each class in proportion to its share (Webster apportionment, which
    never takes a label back as n grows). Ties are broken by a seeded shuffle.
    """
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=g)
    y = labels[shuffled]
    key = torch.empty(len(y), dtype=torch.float64)
    for c in y.unique():
        pos = (y == c).nonzero().squeeze(1)  # shuffled positions of class c
        rank = torch.arange(len(pos), dtype=torch.float64)
        key[pos] = torch.where(rank == 0, -1.0, (rank + 0.5) / len(pos))
    return shuffled[torch.sort(key, stable=True).indices]


def label_budget(labels: Tensor, budget: int | float, seed: int, num_classes: int) -> Tensor:
    """Positions of a stratified, seeded, nested label budget within ``labels``."""
    n = budget_count(budget, len(labels), num_classes)
    return label_order(labels, seed)[:n].to(labels.device)


def validation_count(k: Tensor, fraction: float) -> Tensor:
    """How many of a class's first ``k`` budget images validate: none of 1, then max(1, floor(fraction * k)).

    It never falls as ``k`` grows and rises by at most one per image, so the i-th image of a class is
    a validation image exactly when the count rises at it: both halves of every budget are prefixes
    of two fixed sequences, hence nested like the budgets. With fraction <= 0.5 at least one image
    of every class with two or more is left to train on.
    """
    return torch.where(k < 2, torch.zeros_like(k), torch.clamp((fraction * k.double()).floor().long(), min=1))


def realistic_budget(labels: Tensor, budget: int | float, seed: int, num_classes: int,
                     fraction: float) -> tuple[Tensor, Tensor]:
    """(train, val) positions within ``labels``: the budget of ``label_budget``, with its validation
    labels carved out of it (Oliver et al. 2018), so that an n-label result used n labels in all.

    Per class, the images of the budget in their seeded order alternate between training and
    validation by ``validation_count``: stratified, seeded, nested across budgets, and at least one
    validation image per class. A budget with fewer than two images of some class cannot have both
    and raises DataError naming the smallest budget that can.
    """
    n = budget_count(budget, len(labels), num_classes)
    order = label_order(labels, seed)
    y = labels.cpu()[order]
    rank = torch.zeros(len(y), dtype=torch.long)  # 1-based rank of each image within its class, in order
    for c in range(num_classes):
        at = (y == c).nonzero().squeeze(1)
        rank[at] = torch.arange(1, len(at) + 1)
    is_val = validation_count(rank, fraction) > validation_count(rank - 1, fraction)
    seen = torch.bincount(y[:n], minlength=num_classes)
    if seen.min() < 2:
        seconds = [((y == c) & (rank == 2)).nonzero() for c in range(num_classes)]
        needed = (f"{max(int(s[0, 0]) for s in seconds) + 1} labels or more with this seed" if all(len(s) for s in seconds)
                  else "no budget can: a class has fewer than two images")
        raise DataError(f"label budget {budget} ({n} labels) leaves class {int(seen.argmin())} with {int(seen.min())} "
                        f"image(s); the realistic protocol needs two per class (one to train on, one to validate "
                        f"with): {needed}")
    chosen = order[:n]
    dev = labels.device
    return chosen[~is_val[:n]].to(dev), chosen[is_val[:n]].to(dev)


# ---- batch ops: float batches (B, C, H, W) with values in [0, 1] --------------------------


def to_float(x: Tensor) -> Tensor:
    return x.float().div_(255)


def normalize(x: Tensor, mean: tuple[float, ...] | Tensor, std: tuple[float, ...] | Tensor) -> Tensor:
    """Per-channel standardisation. Pass ``mean``/``std`` as tensors already on ``x``'s device where
    this runs per batch: a tuple is copied to a GPU each call, a copy that waits for the GPU."""
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def gaussian_noise(x: Tensor, std: float, g: torch.Generator) -> Tensor:
    return x + std * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _coin(n: int, p: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) < p


def random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = _coin(len(x), 0.5, g, x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def random_crop(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Reflect-pad by ``pad`` and cut a random HxW window per image, by one gather."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def crop_flip(x: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """The light fine-tuning augmentation: random crop with padding, then horizontal flip."""
    return random_flip(random_crop(x, pad, g), g)


def random_resized_crop(x: Tensor, g: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """Per-image random area/aspect crop resized back to HxW, as one ``grid_sample``."""
    b = len(x)
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(*scale, generator=g)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = log_r.exp()
    sw = (area * r).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - sw)  # crop centre in [-1, 1]
    cy = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - sh)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sw, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.split(1, dim=1)  # luma weights as scalars: no host-to-GPU copy per batch
    return r * 0.299 + g * 0.587 + b * 0.114


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, gch, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-8), torch.zeros_like(maxc))
    dc = delta.clamp(min=1e-8)
    h = torch.where(
        maxc == r, ((gch - b) / dc) % 6, torch.where(maxc == gch, (b - r) / dc + 2, (r - gch) / dc + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B, 3, H, W)
    f = v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return f


def color_jitter(x: Tensor, g: torch.Generator, strength: float = 0.5, p: float = 0.8) -> Tensor:
    """SimCLR's colour distortion on a batch: brightness, contrast, saturation (0.8 s) and hue (0.2 s)."""
    b, dev = len(x), x.device

    def factor(amount: float) -> Tensor:
        return torch.empty(b, 1, 1, 1, device=dev).uniform_(1 - amount, 1 + amount, generator=g)

    s = strength
    y = (x * factor(0.8 * s)).clamp(0, 1)  # brightness
    mean = _gray(y).mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * factor(0.8 * s) + mean).clamp(0, 1)  # contrast
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * factor(0.8 * s) + gray).clamp(0, 1)  # saturation
        hsv = _rgb_to_hsv(y)
        shift = torch.empty(b, 1, 1, device=dev).uniform_(-0.2 * s, 0.2 * s, generator=g)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        y = _hsv_to_rgb(hsv)
    apply = _coin(b, p, g, dev).view(-1, 1, 1, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    if x.shape[1] == 1:
        return x
    apply = _coin(len(x), p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def simclr_view(x: Tensor, g: torch.Generator) -> Tensor:
    """One SimCLR view (Chen et al. 2020): random resized crop, flip, colour jitter, grayscale."""
    x = random_flip(random_resized_crop(x, g), g)
    return random_grayscale(color_jitter(x, g), g)


AUGMENTATIONS = {
    "none": lambda x, g: x,
    "flip": random_flip,
    "crop_flip": crop_flip,
    "simclr": simclr_view,
}
AUGMENTATION_TEXT = {  # what a report says each one does
    "none": "none",
    "flip": "horizontal flip (p 0.5)",
    "crop_flip": "random crop after 4-pixel reflection padding, horizontal flip (p 0.5)",
    "simclr": "random resized crop (area 0.2-1, aspect 3/4-4/3), horizontal flip (p 0.5), colour jitter "
              "(brightness, contrast, saturation 0.4, hue 0.1; p 0.8), grayscale (p 0.2)",
}


def augmentation(name: str):
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{name}'; known: {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
