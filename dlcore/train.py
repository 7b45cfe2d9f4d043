"""One training function for every stage: pretraining objectives and supervised fine-tunes.

``train(cfg, report)`` runs ``cfg.steps`` optimizer steps, evaluates on the validation split
every ``cfg.eval_every`` steps, keeps the best checkpoint by ``cfg.metric``, and at the end
evaluates that checkpoint on the test split. It knows nothing of Ray or MLflow: the sweep
runner passes ``tune.report`` in through ``report(metrics, checkpoint_dir)``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import losses, models
from .embeddings import embedding_stats

OBJECTIVES = ("autoencoder", "simclr", "barlow", "classify", "decode")
FINETUNE_MODES = ("full", "frozen", "linear")
FEATURES = {  # what a classifier reads from its encoder
    "code": "the encoder's output (the conv encoder's FC code, ResNet's pooled features, the MLP's last layer)",
    "conv": "the conv encoder's last feature map, flattened: its input to the FC layers (a probe's usual layer)",
}
PRECISIONS = ("auto", "fp32", "bf16")
VALIDATION = {  # how a classifier's checkpoint is selected, and which labels that reads
    "oracle": "the best checkpoint on a fixed split of val_size labelled images, outside the budget",
    "realistic": "the best checkpoint on val_fraction of the budget's own labels (at least one per class)",
    "none": "no selection: the last checkpoint, fixed hyperparameters",
}
METRICS = {  # validation metrics each objective reports, any of which can select the best checkpoint
    "classify": ("val_acc", "val_loss"),
    "autoencoder": ("val_loss",),
    "decode": ("val_loss",),
    "simclr": ("val_loss", "val_knn_acc"),
    "barlow": ("val_loss", "val_knn_acc"),
}

Report = Callable[[dict, "str | None"], None]

THREADS_EVERY_S = 2.0  # how often a run with ``threads_now`` asks how many threads it may use

# A loss or metric beyond this (or not finite) means the run diverged: an lr of 1000 reaches 1e17
# without ever producing a NaN, and no loss of these objectives is near it while training works.
DIVERGED_ABOVE = 1e6


def diverged(metrics: dict) -> bool:
    """True when any loss or metric of an evaluation is non-finite or beyond ``DIVERGED_ABOVE``."""
    return any(not math.isfinite(v) or abs(v) > DIVERGED_ABOVE for k, v in metrics.items() if _measures_fit(k))


def _measures_fit(key: str) -> bool:
    """Losses, errors and accuracies; not steps, counts or throughput."""
    return key.endswith(("loss", "acc", "_l1", "_l2"))


@dataclass
class TrainConfig:
    objective: str = "classify"  # one of OBJECTIVES; "autoencoder" with noise_std > 0 is a DAE
    # data
    dataset: str = "mnist"  # name looked up in data_dir, or a path to an .npz
    data_dir: str | None = None
    classes: list[int] | None = None  # keep and relabel these classes (E1: [3, 5])
    val_size: int | float = 5000  # images carved from train: pretraining validation, and the oracle's labels
    split_seed: int = 0  # the validation split is shared by every trial of a study
    validation: str = "oracle"  # classify: oracle | realistic | none (see VALIDATION)
    val_fraction: float = 0.2  # realistic: share of each class's budget images that validate
    labels: int | float | None = None  # label budget (count or fraction of the pool); None: all
    test_size: int | None = None  # evaluate on the first N test images only (smoke runs)
    normalize: bool = False  # standardise inputs by the data set's channel mean/std
    augment: str = "none"  # see data.AUGMENTATIONS; SimCLR/Barlow default to "simclr"
    noise_std: float = 0.0  # Gaussian input noise, in [0, 1] pixel units (E5: 0.5)
    # model
    encoder: str = "conv"
    encoder_args: dict = field(default_factory=dict)
    decoder: str | None = None  # default: the encoder's mirror
    head_hidden: int = 128  # 0: linear head
    proj_dim: int = 128
    proj_hidden: int = 2048
    init_encoder: str | None = None  # path to an encoder state dict (pretrained)
    finetune: str = "full"  # full: train all; frozen: train the head; linear: frozen + linear head
    features: str = "code"  # what the classifier reads: code (the encoder's output) or conv (see FEATURES)
    encoder_lr: float | None = None  # encoder's own learning rate in "full" mode; None: lr
    # optimisation
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    # losses
    recon_loss: str = "l1"
    temperature: float = 0.5
    barlow_lambda: float = 5e-3
    # evaluation
    eval_every: int = 100
    eval_batch_size: int = 1000
    metric: str | None = None  # default: val_acc for classify, val_loss otherwise
    step_budgets: list[int] | None = None  # smaller step budgets to read off this run (constant schedules only)
    test_curve: bool = False  # also evaluate the test set at every evaluation, for display, never for selection
    knn_monitor: bool = False  # SSL: k-NN accuracy on validation; reads labels, which are counted
    knn_bank: int = 10000  # pool images the SSL k-NN monitor compares against
    # run
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16: autocast to bf16 where the hardware computes it natively
    out_dir: str = "."
    recon_samples: int = 64  # test images kept as input/reconstruction examples for autoencoders
    embeddings: bool = False  # write embeddings.pt: how the selected encoder lays out the test set's classes
    resume_every_s: float = 60.0  # a restartable snapshot goes with a report at least this often (0: every evaluation)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective '{self.objective}'; known: {list(OBJECTIVES)}")
        if self.validation not in VALIDATION:
            raise ValueError(f"unknown validation protocol '{self.validation}'; known: {list(VALIDATION)}")
        if not 0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.step_budgets and (self.schedule == "cosine" or any(not 0 < s < self.steps for s in self.step_budgets)):
            raise ValueError(f"step_budgets {self.step_budgets} must lie in (0, steps={self.steps}) and need a schedule "
                             "that does not depend on the total (not cosine)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{self.precision}'; known: {list(PRECISIONS)}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode '{self.finetune}'; known: {list(FINETUNE_MODES)}")
        if self.features not in FEATURES:
            raise ValueError(f"unknown features '{self.features}'; known: {list(FEATURES)}")
        if self.features == "conv" and (self.encoder != "conv" or self.objective != "classify"):
            raise ValueError("features 'conv' is for classifiers on the conv encoder (its flattened feature map); "
                             f"got objective '{self.objective}', encoder '{self.encoder}'")
        if self.objective == "decode" and not self.init_encoder:
            raise ValueError("objective 'decode' needs init_encoder (the encoder to decode from)")
        if self.metric is None:
            self.metric = "val_acc" if self.objective == "classify" else "val_loss"
        if self.metric == "val_knn_acc":
            self.knn_monitor = True
        known = METRICS[self.objective]
        if self.metric not in known:
            raise ValueError(f"metric '{self.metric}' is not reported by objective '{self.objective}'; known: {list(known)}")

    @property
    def mode(self) -> str:
        return "max" if self.metric.endswith("acc") else "min"

    @property
    def selects(self) -> bool:
        """Whether checkpoints are chosen on validation (every protocol but 'none' does)."""
        return not (self.objective == "classify" and self.validation == "none")


def pick_device(name: str = "auto") -> torch.device:
    """The one place the device is chosen."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA GPUs from Ampere on; CPUs with AVX-512 BF16,
    AMX or Arm's BF16 extension. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities()
    return any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16"))


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class Batches:
    """Endless batches of positions in range(n): shuffled epochs, chained so every batch is full.
    ``buf``, the positions drawn but not yet handed out, is its whole state besides ``g``'s."""

    def __init__(self, n: int, batch_size: int, g: torch.Generator, device, buf: Tensor | None = None):
        self.n, self.batch_size, self.g, self.device = n, batch_size, g, device
        self.buf = buf if buf is not None else torch.empty(0, dtype=torch.long, device=device)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        while len(self.buf) < self.batch_size:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.g, device=self.device)])
        out, self.buf = self.buf[: self.batch_size], self.buf[self.batch_size :]
        return out


@dataclass
class Split:
    """Index sets into the training images: the pool labels come from, the budget, validation."""

    train: Tensor  # images the stage trains on (labelled budget, or the whole pool)
    val: Tensor
    pool: Tensor


def make_split(ds: D.Dataset, cfg: TrainConfig) -> Split:
    """The held-out split (val_size images) is the same for every trial; pretraining validates on it
    without labels. A classifier's validation follows its protocol: the held-out split's labels
    (oracle), a share of its own budget (realistic), or nothing (none)."""
    pool, val = D.validation_split(len(ds.y_train), cfg.val_size, cfg.split_seed)
    pool, val = pool.to(ds.y_train.device), val.to(ds.y_train.device)
    train = pool
    if cfg.objective != "classify":
        return Split(train=train, val=val, pool=pool)
    labels = ds.y_train[pool]
    if cfg.validation == "realistic":
        train, val = D.realistic_budget(labels, cfg.labels if cfg.labels is not None else 1.0, cfg.seed,
                                        ds.num_classes, cfg.val_fraction)
        return Split(train=pool[train], val=pool[val], pool=pool)
    if cfg.labels is not None:
        train = pool[D.label_budget(labels, cfg.labels, cfg.seed, ds.num_classes)]
    if cfg.validation == "none":
        val = val[:0]
    return Split(train=train, val=val, pool=pool)


def labels_read(cfg: TrainConfig, split: Split) -> dict:
    """Labels this run read: to train on, to select with, and by a monitor (the SSL k-NN)."""
    supervised = cfg.objective == "classify"
    knn = cfg.knn_monitor and cfg.objective in ("simclr", "barlow")
    monitor = min(cfg.knn_bank, len(split.pool)) + len(split.val) if knn else 0
    return {"labels_train": len(split.train) if supervised else 0, "labels_val": len(split.val) if supervised else 0,
            "labels_monitor": monitor}


def build_model(cfg: TrainConfig, ds: D.Dataset) -> nn.Module:
    shape = ds.image_shape
    encoder = models.build_encoder(cfg.encoder, shape, **cfg.encoder_args)
    if cfg.init_encoder:
        encoder.load_state_dict(models.load_state(cfg.init_encoder))
    if cfg.objective in ("autoencoder", "decode"):
        # Normalised targets are not in [0, 1], so no sigmoid for them.
        decoder_args = {**cfg.encoder_args, **({"sigmoid": False} if cfg.normalize else {})}
        decoder = models.build_decoder(cfg.decoder or cfg.encoder, shape, **decoder_args)
        return models.Autoencoder(encoder, decoder)
    if cfg.objective in ("simclr", "barlow"):
        return models.Siamese(encoder, models.projection_head(encoder.out_dim, cfg.proj_dim, cfg.proj_hidden))
    if cfg.features == "conv":
        encoder = models.conv_features(encoder)
    hidden = 0 if cfg.finetune == "linear" else cfg.head_hidden
    return models.Classifier(encoder, models.mlp_head(encoder.out_dim, ds.num_classes, hidden))


def uses_channels_last(cfg: TrainConfig) -> bool:
    """Conv models train faster in NHWC: ~1.2x measured on the 2-core CPU as well as on GPUs."""
    return cfg.encoder != "mlp"


def encoder_frozen(cfg: TrainConfig) -> bool:
    """A decoder's encoder, and a classifier's outside 'full' mode: pretrained, or at its random
    initialisation (a random-features baseline)."""
    return cfg.objective == "decode" or (cfg.objective == "classify" and cfg.finetune != "full")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    frozen = encoder_frozen(cfg)
    for p in model.encoder.parameters():
        p.requires_grad_(not frozen)
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": rest, "lr": cfg.lr}]
    if not frozen:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.encoder_lr or cfg.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    # One fused kernel per step instead of a dozen per parameter: ~1 ms of a ~17 ms step on the 2-core
    # CPU for E2's classifier. Fused kernels exist for the CPU and CUDA, not for every device.
    fused = next(model.parameters()).device.type in ("cpu", "cuda") or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'; known: ['adamw', 'sgd']")


class Batcher:
    """Turns positions into model inputs: uint8 -> float, augmentation, noise, normalisation."""

    def __init__(self, ds: D.Dataset, cfg: TrainConfig, device: torch.device):
        self.ds, self.cfg, self.device = ds, cfg, device
        default_aug = "simclr" if cfg.objective in ("simclr", "barlow") else "none"
        self.augment = D.augmentation(cfg.augment if cfg.augment != "none" else default_aug)
        self.channels_last = uses_channels_last(cfg)
        self.mean, self.std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (ds.mean, ds.std))  # once, not per batch

    def _finish(self, x: Tensor) -> Tensor:
        if self.cfg.normalize:
            x = D.normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def pixels(self, x: Tensor) -> Tensor:
        """A model input or output back in [0, 1] pixel units (undoes the normalisation)."""
        return x * self.std + self.mean if self.cfg.normalize else x

    def plain(self, images: Tensor) -> Tensor:
        """Un-augmented, noise-free model input."""
        return self._finish(D.to_float(images))

    def inputs(self, images: Tensor, g: torch.Generator, train: bool) -> tuple:
        """(input, target) for autoencoders, (view1, view2) for SSL, (input,) otherwise."""
        x = D.to_float(images)  # (B, C, H, W) in [0, 1]
        obj = self.cfg.objective
        if obj in ("simclr", "barlow"):
            return self._finish(self.augment(x, g)), self._finish(self.augment(x, g))
        if train:
            x = self.augment(x, g)
        if obj in ("autoencoder", "decode"):
            noisy = D.gaussian_noise(x, self.cfg.noise_std, g) if self.cfg.noise_std else x
            return self._finish(noisy), self._finish(x)
        return (self._finish(x),)


def objective_loss(model: nn.Module, inputs: tuple, y: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor | None]:
    """The stage's loss on one batch, and the classifier's logits (None for other objectives)."""
    if cfg.objective in ("autoencoder", "decode"):
        x, target = inputs
        return losses.reconstruction_loss(cfg.recon_loss)(model(x), target), None
    if cfg.objective in ("simclr", "barlow"):
        _, z1 = model(inputs[0])
        _, z2 = model(inputs[1])
        if cfg.objective == "simclr":
            return losses.nt_xent(z1.float(), z2.float(), cfg.temperature), None
        return losses.barlow_twins(z1.float(), z2.float(), cfg.barlow_lambda), None
    logits = model(inputs[0])
    return F.cross_entropy(logits.float(), y), logits


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if encoder_frozen(cfg) and cfg.init_encoder:
        model.encoder.eval()  # a frozen pretrained encoder keeps its BatchNorm statistics
    # A frozen encoder at its random initialisation keeps BatchNorm in training mode: its statistics,
    # never fitted, are fitted to the data (its weights stay as drawn), or its features would reach
    # the head unnormalised, ~12x too small in E3's CNN, a baseline set up to lose.


@torch.inference_mode()
def evaluate(model, batcher: Batcher, images: Tensor, labels: Tensor, cfg: TrainConfig, autocast, prefix: str) -> dict:
    """Mean loss (and accuracy for classifiers) over ``images``; augmentation and noise from a fixed seed.

    Autoencoders also get their mean L1 and L2 (squared) error per pixel in [0, 1] pixel units, whatever
    loss they train on and whether their inputs are normalised, so that stages compare in common units."""
    model.eval()
    g = torch.Generator(device=images.device).manual_seed(12345)
    recon = cfg.objective in ("autoencoder", "decode")
    total, correct, n = 0.0, 0, 0
    l1 = l2 = 0.0
    for xb, yb in zip(images.split(cfg.eval_batch_size), labels.split(cfg.eval_batch_size)):
        inputs = batcher.inputs(xb, g, train=False)
        with autocast():
            if recon:
                out = model(inputs[0]).float()
                loss, logits = losses.reconstruction_loss(cfg.recon_loss)(out, inputs[1]), None
                out_px, target_px = batcher.pixels(out), batcher.pixels(inputs[1])
                l1 += losses.l1(out_px, target_px).item() * len(xb)
                l2 += losses.l2(out_px, target_px).item() * len(xb)
            else:
                loss, logits = objective_loss(model, inputs, yb, cfg)
        total += loss.item() * len(xb)
        n += len(xb)
        if logits is not None:
            correct += (logits.argmax(1) == yb).sum().item()
    out = {f"{prefix}_loss": total / n}
    if cfg.objective == "classify":
        out[f"{prefix}_acc"] = correct / n
    if recon:
        out.update({f"{prefix}_l1": l1 / n, f"{prefix}_l2": l2 / n})
    return out


@torch.inference_mode()
def knn_accuracy(model, batcher: Batcher, ds: D.Dataset, split: Split, cfg: TrainConfig, autocast, k: int = 20) -> float:
    """Cosine k-NN accuracy of encoder features (val against ``cfg.knn_bank`` pool images): a label-free
    pretraining monitor that tracks downstream accuracy better than the SSL loss does."""
    model.eval()

    def features(idx: Tensor) -> Tensor:
        out = []
        for chunk in idx.split(cfg.eval_batch_size):
            with autocast():
                out.append(F.normalize(model.encoder(batcher.plain(ds.x_train[chunk])).float(), dim=1))
        return torch.cat(out)

    bank_idx = split.pool[: cfg.knn_bank]
    bank, query = features(bank_idx), features(split.val)  # (M, F), (V, F)
    nearest = (query @ bank.T).topk(k, dim=1).indices  # (V, k)
    votes = F.one_hot(ds.y_train[bank_idx][nearest], ds.num_classes).sum(1)  # (V, classes)
    return (votes.argmax(1) == ds.y_train[split.val]).float().mean().item()


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / "model.pt")
    torch.save(model.encoder.state_dict(), path / "encoder.pt")
    (path / "meta.json").write_text(json.dumps(meta))


RESUME = "resume.pt"  # in a reported checkpoint until the run ends: what a restarted run continues from


def save_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, stream: Batches, progress: dict) -> None:
    """The run as it stands after an evaluation: weights, optimizer, data order and random state, and
    ``progress`` (step, best, history, timings). Written beside the best checkpoint, which it agrees with."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "stream": stream.buf,
             "generator": stream.g.get_state(), "torch_rng": torch.get_rng_state(), **progress}
    if stream.buf.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state()  # the trial's own device
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / (RESUME + ".tmp"))
    (path / (RESUME + ".tmp")).replace(path / RESUME)


def load_resume(saved: Path, ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, stream: Batches, device) -> dict:
    """Puts a run back where ``save_resume`` left it (the best checkpoint's files copied to ``ckpt``);
    returns its ``progress``."""
    state = torch.load(saved / RESUME, map_location="cpu", weights_only=False)  # random states must stay on the CPU
    ckpt.mkdir(parents=True, exist_ok=True)
    for f in saved.iterdir():
        if f.is_file() and f.name != RESUME:
            shutil.copy2(f, ckpt / f.name)
    model.load_state_dict(state.pop("model"))
    opt.load_state_dict(state.pop("optimizer"))
    stream.buf = state.pop("stream").to(device)
    stream.g.set_state(state.pop("generator"))
    torch.set_rng_state(state.pop("torch_rng"))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state.pop("cuda_rng"))
    return state


def train(cfg: TrainConfig, report: Report | None = None, data: D.Dataset | None = None, resume: str | None = None,
          threads_now: Callable[[], int] | None = None) -> dict:
    """Run one stage; returns the final metrics (best validation step and its test metrics).

    Writes ``<out_dir>/checkpoint/`` (model.pt, encoder.pt, meta.json, history.json and, for
    autoencoders, samples.pt) and calls ``report(metrics, checkpoint_dir)`` after every
    evaluation and once at the end with the test metrics. An evaluation passes checkpoint_dir when
    the best checkpoint changed or ``cfg.resume_every_s`` passed since the last one; until the end
    it holds ``resume.pt`` too, and ``resume`` (a copy of such a folder) continues that run where it
    was, to the same result. ``threads_now``, asked every ``THREADS_EVERY_S``, sets the number of
    threads while it runs (the sweep runner's answer follows the cores no trial holds).
    """
    report = report or (lambda metrics, checkpoint_dir: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a run's shapes are fixed: cuDNN times its kernels once, keeps the fastest
    torch.manual_seed(cfg.seed)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    bf16 = uses_bf16(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    ds = data if data is not None else D.load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.classes:
        ds = D.select_classes(ds, cfg.classes)
    if cfg.test_size:
        ds = replace(ds, x_test=ds.x_test[: cfg.test_size], y_test=ds.y_test[: cfg.test_size])
    ds = ds.to(device)
    split = make_split(ds, cfg)
    model = build_model(cfg, ds).to(device)
    if uses_channels_last(cfg):
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    batcher = Batcher(ds, cfg, device)
    ckpt = Path(cfg.out_dir) / "checkpoint"
    better = (lambda a, b: a > b) if cfg.mode == "max" else (lambda a, b: a < b)

    best, best_step, history = None, 0, []
    budgets = sorted(set(cfg.step_budgets or ()))
    labels = labels_read(cfg, split)
    run_loss, run_correct, run_n = 0.0, 0, 0
    t0 = time.perf_counter()
    eval_s = 0.0  # time spent evaluating, left out of the training throughput

    def evaluation(done: int) -> dict:
        """Train metrics since the last evaluation, validation (and test-curve) metrics now."""
        metrics = {"step": done, "threads": torch.get_num_threads(), **labels}  # labels: what a run stopped early read
        if run_n:
            metrics["train_loss"] = float(run_loss) / run_n
            if cfg.objective == "classify":
                metrics["train_acc"] = float(run_correct) / run_n
        if len(split.val):
            metrics.update(evaluate(model, batcher, ds.x_train[split.val], ds.y_train[split.val], cfg, autocast, "val"))
        if labels["labels_monitor"]:
            metrics["val_knn_acc"] = knn_accuracy(model, batcher, ds, split, cfg, autocast)
        if cfg.test_curve:  # for display: never read by any selection
            test = evaluate(model, batcher, ds.x_test, ds.y_test, cfg, autocast, "test")
            metrics.update({k.replace("test_", "test_curve_"): v for k, v in test.items()})
        return metrics

    def read_off(done: int) -> dict:
        """What this run would have returned had ``steps`` been ``done``: the checkpoint selected so
        far and its test metrics (one test evaluation per step budget)."""
        chosen = model
        if best_step != done:
            chosen = copy.deepcopy(model)
            chosen.load_state_dict(models.load_state(ckpt / "model.pt", device))
        out = {"best_step": best_step, **evaluate(chosen, batcher, ds.x_test, ds.y_test, cfg, autocast, "test")}
        if best is not None:
            out[f"best_{cfg.metric}"] = best
        return {f"at{done}/{k}": v for k, v in out.items()}

    stream = Batches(len(split.train), cfg.batch_size, g, device)
    first, resumed_from = -1, None
    if resume and (Path(resume) / RESUME).exists():
        progress = load_resume(Path(resume), ckpt, model, opt, stream, device)
        first = resumed_from = progress["step"]  # that evaluation was reported before the run stopped
        best, best_step, history, eval_s = progress["best"], progress["best_step"], progress["history"], progress["eval_s"]
        t0 = time.perf_counter() - progress["elapsed_s"]
        set_train_mode(model, cfg)
    snapshot_at = threads_at = time.perf_counter()
    for step in range(first, cfg.steps):
        done = step + 1
        if threads_now is not None and time.perf_counter() - threads_at >= THREADS_EVERY_S:
            if (n := threads_now()) != torch.get_num_threads():
                torch.set_num_threads(n)
            threads_at = time.perf_counter()
        if step >= 0:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * get_lr(step, cfg)
            idx = split.train[next(stream)]
            yb = ds.y_train[idx]
            with autocast():
                loss, logits = objective_loss(model, batcher.inputs(ds.x_train[idx], g, train=True), yb, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.detach() * len(idx)  # stays on device: no sync per step
            run_n += len(idx)
            if logits is not None:
                run_correct += (logits.argmax(1) == yb).sum()
            if done % cfg.eval_every and done != cfg.steps and done not in budgets:
                continue
        elif not (len(split.val) or cfg.test_curve):
            continue  # step 0 (before training) is evaluated only when there is something to measure
        t_eval = time.perf_counter()
        metrics = evaluation(done)
        if diverged(metrics):
            # Stop now: the last finite values are the previous evaluation's, already reported.
            final = {"step": done, "diverged_step": done, "train_size": len(split.train), **labels,
                     "wall_s": time.perf_counter() - t0}
            (ckpt / RESUME).unlink(missing_ok=True)
            report(final, None)
            return final
        improved = not cfg.selects or best is None or better(metrics[cfg.metric], best)
        if improved:
            best, best_step = metrics.get(cfg.metric), done
            save_checkpoint(model, ckpt, {"step": done, cfg.metric: best})
        if done in budgets:
            metrics.update(read_off(done))
        if done:
            metrics["samples_per_s"] = done * cfg.batch_size / (t_eval - t0 - eval_s)  # training time only
        history.append(metrics)
        snapshot = improved or time.perf_counter() - snapshot_at >= cfg.resume_every_s
        if snapshot:  # evaluation's time too: it is not training
            save_resume(ckpt, model, opt, stream, {"step": done, "best": best, "best_step": best_step, "history": history,
                                                   "eval_s": eval_s + time.perf_counter() - t_eval,
                                                   "elapsed_s": time.perf_counter() - t0})
            snapshot_at = time.perf_counter()
        eval_s += time.perf_counter() - t_eval
        report(metrics, str(ckpt) if snapshot else None)
        run_loss, run_correct, run_n = 0.0, 0, 0
        set_train_mode(model, cfg)

    (ckpt / RESUME).unlink(missing_ok=True)  # the run is over: what is left is the selected checkpoint

    model.load_state_dict(models.load_state(ckpt / "model.pt", device))
    final = {"step": cfg.steps, "best_step": best_step}
    if best is not None:
        final[f"best_{cfg.metric}"] = best
    t_test = time.perf_counter()
    final.update(evaluate(model, batcher, ds.x_test, ds.y_test, cfg, autocast, "test"))
    final["eval_s"] = eval_s + time.perf_counter() - t_test  # every evaluation's seconds, the final test's included
    final.update(train_size=len(split.train), train_bf16=float(bf16), **labels, labels_total=sum(labels.values()))
    if resumed_from is not None:
        final["resumed_from_step"] = resumed_from
    final["wall_s"] = time.perf_counter() - t0
    (ckpt / "history.json").write_text(json.dumps(history))
    if cfg.objective in ("autoencoder", "decode"):
        torch.save(reconstruction_samples(model, batcher, ds, cfg, autocast), ckpt / "samples.pt")
    if cfg.embeddings:
        z = encode(model, batcher, ds.x_test, cfg, autocast)
        torch.save(embedding_stats(z, ds.y_test, ds.num_classes), ckpt / "embeddings.pt")
    report(final, str(ckpt))
    return final


@torch.inference_mode()
def encode(model, batcher: Batcher, images: Tensor, cfg: TrainConfig, autocast) -> Tensor:
    """The encoder's output for ``images`` (un-augmented), in eval mode."""
    model.eval()
    out = []
    for chunk in images.split(cfg.eval_batch_size):
        with autocast():
            out.append(model.encoder(batcher.plain(chunk)).float())
    return torch.cat(out)


@torch.inference_mode()
def reconstruction_samples(model, batcher: Batcher, ds: D.Dataset, cfg: TrainConfig, autocast) -> dict:
    """The first ``cfg.recon_samples`` test images: clean, model input (noisy for a DAE) and output, in [0, 1]."""
    model.eval()
    g = torch.Generator(device=ds.x_test.device).manual_seed(0)
    images, labels = ds.x_test[: cfg.recon_samples], ds.y_test[: cfg.recon_samples]
    x, target = batcher.inputs(images, g, train=False)
    with autocast():
        recon = model(x).float()

    def unnormalize(t: Tensor) -> Tensor:
        return batcher.pixels(t.float()).clamp(0, 1).cpu()

    return {"clean": unnormalize(target), "input": unnormalize(x), "output": unnormalize(recon), "labels": labels.cpu()}
