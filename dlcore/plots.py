"""Figures shared by trial artifacts and reports (matplotlib, Agg backend, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 110})

# One colour per arm, the same in every figure: scratch grey, pretrained arms from tab10.
SCRATCH_COLOR = "#6b6b6b"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def arm_colors(arms: list[str], scratch: set[str] = frozenset({"scratch"})) -> dict[str, str]:
    colors, i = {}, 0
    for arm in sorted(arms):
        if arm in scratch:
            colors[arm] = SCRATCH_COLOR
        else:
            colors[arm] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def save(fig, path: Path, svg: bool = False) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    out = [path]
    if svg:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
        out.append(path.with_suffix(".svg"))
    plt.close(fig)
    return out


def loss_curves(history: dict[str, list[tuple[int, float]]], title: str = ""):
    """history: metric name -> [(step, value)]; losses on the left axis, accuracies on the right."""
    fig, ax = plt.subplots(1, 2 if any(k.endswith("acc") for k in history) else 1, figsize=(9, 3.4), squeeze=False)
    styles = {"train": "-", "val": "--", "test": ":"}
    for name, points in sorted(history.items()):
        if not points or not name.endswith(("_loss", "_acc")) or name.startswith(("best_", "test_")):
            continue
        steps, values = zip(*sorted(points))
        col = 1 if name.endswith("acc") else 0
        ax[0, col].plot(steps, values, styles.get(name.split("_")[0], "-"), marker="o", ms=3, label=name.replace("_", " "))
    for a, label in zip(ax[0], ["loss", "accuracy"]):
        a.set_xlabel("optimizer step")
        a.set_ylabel(label)
        if a.get_legend_handles_labels()[0]:
            a.legend(frameon=False)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(rows: dict[str, torch.Tensor], n: int = 64, per_row: int = 16, title: str = ""):
    """rows: label -> (N, C, H, W) images in [0, 1]; each entry becomes a block of n images."""
    blocks = list(rows.items())
    n = min(n, min(len(v) for _, v in blocks))
    lines = -(-n // per_row)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(per_row * 0.55, len(blocks) * lines * 0.6 + 0.4), squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], blocks):
        imgs = imgs[:n].float().clamp(0, 1)
        c, h, w = imgs.shape[1:]
        pad = torch.ones(lines * per_row - n, c, h, w)
        grid = torch.cat([imgs, pad]).view(lines, per_row, c, h, w).permute(0, 3, 1, 4, 2).reshape(lines * h, per_row * w, c)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, loc="left")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def reconstruction_grid(samples: dict, title: str = "", n: int = 64):
    """Clean / input / output blocks; the input block only when it differs (a denoising model)."""
    rows = {"clean": samples["clean"]}
    if not torch.equal(samples["input"], samples["clean"]):
        rows["noisy input"] = samples["input"]
    rows["reconstruction" if len(rows) == 1 else "denoised"] = samples["output"]
    return image_grid(rows, n=n, title=title)
