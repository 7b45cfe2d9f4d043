"""Figures shared by trial artifacts and reports (matplotlib, Agg backend, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import stats  # noqa: E402

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


def legend_outside(fig, axes) -> None:
    """One legend for every panel, right of them: it never covers a curve or the title, and grows
    downwards one entry per line however many arms there are. Call after ``tight_layout``."""
    entries = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def loss_curves(history: dict[str, list[tuple[int, float]]], title: str = ""):
    """history: metric name -> [(step, value)]; a loss panel and an accuracy panel, each only when
    something was logged for it (an autoencoder gets the loss panel alone). Test metrics logged at
    several steps are drawn too and labelled as never used for selection; a single final test value
    is not a curve."""
    series = {name: sorted(points) for name, points in history.items()
              if points and name.endswith(("_loss", "_acc")) and not name.startswith("best_")
              and (not name.startswith("test_") or len(points) > 1)}
    kinds = [k for k in ("loss", "acc") if any(name.endswith("_" + k) for name in series)] or ["loss"]
    fig, ax = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds) + 0.5, 3.4), squeeze=False)
    styles = {"train": "-", "val": "--", "test": ":"}
    order = lambda name: (list(styles).index(name.split("_")[0]) if name.split("_")[0] in styles else 3, name)
    for name, points in sorted(series.items(), key=lambda kv: order(kv[0])):  # train, val, test in each panel
        steps, values = zip(*points)
        split = name.split("_")[0]
        label = name.replace("_", " ") + (" (never used for selection)" if split == "test" else "")
        color = {"train": "C0", "val": "C1", "test": "C2"}.get(split, "C3") if name.count("_") == 1 else "C3"  # same split, same colour
        ax[0, kinds.index(name.rsplit("_", 1)[1])].plot(steps, values, styles.get(split, "-"), color=color, marker="o", ms=3,
                                                        label=label)
    for a, kind in zip(ax[0], kinds):
        a.set_xlabel("optimizer step")
        a.set_ylabel({"loss": "loss", "acc": "accuracy"}[kind])
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    legend_outside(fig, ax)
    return fig


def ci_caption(seed_counts: list[int], what: str = "point") -> str:
    """What a band means, given how many seeds each point has; with one seed, that there is none."""
    seeds = sorted(set(seed_counts))
    if seeds == [1]:
        return f"one seed per {what}: no confidence band"
    caption = f"mean over {seeds[0]}-{seeds[-1]} seeds" if len(seeds) > 1 else f"mean over {seeds[0]} seeds"
    return caption + "; band: 95% Student-t CI" + (f" (none where a {what} has one seed)" if seeds[0] == 1 else "")


def accuracy_vs(cells: list, colors: dict, title: str, x: str = "labels"):
    """Mean test accuracy of each arm against ``x`` ('labels' or 'steps'), one panel per value of the
    other axis; ``cells`` as ``report.Cell``."""
    other = "steps" if x == "labels" else "labels"
    panels = sorted({getattr(c, other) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, value in zip(axes[0], panels):
        for arm in sorted({c.arm for c in cells}):
            cs = sorted((c for c in cells if c.arm == arm and getattr(c, other) == value), key=lambda c: getattr(c, x))
            if not cs:
                continue
            xs = np.array([getattr(c, x) for c in cs])
            y = np.array([c.mean for c in cs]) * 100
            hw = np.array([c.half_width for c in cs]) * 100
            ax.plot(xs, y, "-o", color=colors[arm], label=arm, ms=4)
            if np.isfinite(hw).any():
                ax.fill_between(xs, y - np.nan_to_num(hw), y + np.nan_to_num(hw), color=colors[arm], alpha=0.18, lw=0)
        ax.set_xscale("log")
        ticks = sorted({getattr(c, x) for c in cells if getattr(c, other) == value})
        ax.set_xticks(ticks, [f"{b:,}" for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("label budget (log scale)" if x == "labels" else "fine-tune steps (log scale)")
        if len(panels) > 1:
            ax.set_title(f"{value:,} fine-tune steps" if other == "steps" else f"{value:,} labels")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    fig.text(0.5, -0.02, ci_caption([c.n for c in cells]) + "; each seed's checkpoint selected on validation",
             ha="center", fontsize=8, color="#444444")
    fig.tight_layout()
    legend_outside(fig, axes)
    return fig


def accuracy_vs_steps(selected: list, colors: dict, title: str, target: float | None):
    """One panel per (label budget, step budget); in each, the mean validation curve of each arm over
    its seeds' selected trials (``selected``: ``report.Trial``s), with the target line."""
    panels = sorted({(t.steps, t.labels) for t in selected if t.curve})
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, (steps, labels) in zip(axes.flat, panels):
        for arm in sorted({t.arm for t in selected}):
            curves = [dict(t.curve) for t in selected if (t.arm, t.labels, t.steps) == (arm, labels, steps) and t.curve]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            y = np.array([[c[s] for s in xs] for c in curves]) * 100  # (seeds, evaluations)
            mean, half = np.array([stats.mean_ci(col) for col in y.T]).T
            ax.plot(xs, mean, color=colors[arm], label=arm)
            if len(curves) > 1:
                ax.fill_between(xs, mean - half, mean + half, color=colors[arm], alpha=0.18, lw=0)
        if target is not None:
            ax.axhline(target * 100, color="#555555", ls=":", lw=1.2, label=f"target {target:.0%}")
        ax.set_title(f"{labels:,} labels, {steps:,} steps")
        ax.set_xlim(0, steps)
        ax.set_xlabel("fine-tune step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    legend_outside(fig, axes)
    return fig


def reconstructions(grids: dict[str, dict], errors: dict[str, dict[str, float]]):
    """Side-by-side blocks, one per stage: E2 autoencoder vs classifier decoder, E5 L1 vs L2. ``errors``:
    stage -> its test L1 and L2 per pixel, which compare across stages whatever loss each trained on."""
    rows = {}
    first = next(iter(grids.values()))
    rows["test images"] = first["clean"]
    for stage, samples in grids.items():
        if not torch.equal(samples["input"], samples["clean"]) and "noisy input" not in rows:
            rows["noisy input"] = samples["input"]
        found = errors.get(stage) or {}
        error = ", ".join(f"{k.upper()} {found[k]:.4f}" for k in ("l1", "l2") if k in found)
        rows[f"{stage}" + (f" (test {error} per pixel)" if error else "")] = samples["output"]
    return image_grid(rows, n=64)


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


def stage_grid(base: str, points: list[dict], downstream: dict[str, dict[int, float]]):
    """A pretraining grid: the stage's test error against its first grid key (one line per combination
    of the others), and beside it the downstream test accuracy per label budget."""
    keys = list(points[0]["point"])
    x_key, rest = keys[0], keys[1:]
    metric = "test_l1" if any(p["test_l1"] is not None for p in points) else "test_loss"
    panels = 2 if downstream else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    xs = sorted({p["point"][x_key] for p in points}, key=lambda v: (isinstance(v, str), v))
    position = {v: i for i, v in enumerate(xs)}  # categorical axis: values need not be evenly spaced
    groups = sorted({tuple(p["point"][k] for k in rest) for p in points}, key=str)
    budgets = sorted({n for accs in downstream.values() for n in accs})
    for g_i, group in enumerate(groups):
        mine = sorted((p for p in points if tuple(p["point"][k] for k in rest) == group), key=lambda p: position[p["point"][x_key]])
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(rest, group))
        ax = axes[0, 0]
        pts = [(position[p["point"][x_key]], p[metric]) for p in mine if p[metric] is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", color=f"C{g_i}", ms=4, label=name or base)
        for b_i, n in enumerate(budgets if downstream else []):
            pts = [(position[p["point"][x_key]], downstream[p["stage"]][n] * 100) for p in mine
                   if n in downstream.get(p["stage"], {})]
            if pts:
                axes[0, 1].plot(*zip(*pts), ["-o", "--s", ":^", "-.v"][b_i % 4], color=f"C{g_i}", ms=4,
                                label=f"{name + ', ' if name else ''}{n:,} labels")
    for ax in axes[0]:
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_xlabel(x_key.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel({"test_l1": "test L1 (mean per pixel)", "test_loss": "test loss"}[metric])
    if downstream:
        axes[0, 1].set_ylabel("fine-tuned test accuracy (%)")
    fig.suptitle(f"pretraining grid: {base}")
    fig.tight_layout()
    legend_outside(fig, axes)
    return fig


def embeddings(stats: dict[str, dict]):
    """One row per stage: the test set on its top two principal axes, coloured by class, and the
    class-centroid distance matrix as a heat map (shared colour scale across stages)."""
    names = sorted(stats)
    fig, axes = plt.subplots(len(names), 2, figsize=(9.5, 4.0 * len(names)), squeeze=False)
    vmax = max(float(e["centroid_dist"].max()) for e in stats.values())
    for row, name in zip(axes, names):
        e = stats[name]
        p, y = e["projection"].numpy(), e["labels"].numpy()
        scatter = row[0].scatter(p[:, 0], p[:, 1], c=y, cmap="tab10", s=4, alpha=0.7, vmin=-0.5, vmax=9.5)
        row[0].set_title(f"{name}: principal axes 1-2 (separation {e['separation']:.2f})", fontsize=9)
        row[0].set_xticks([])
        row[0].set_yticks([])
        fig.colorbar(scatter, ax=row[0], ticks=range(len(e["spread"])), label="class")
        im = row[1].imshow(e["centroid_dist"].numpy(), cmap="viridis", vmin=0, vmax=vmax)
        row[1].set_title(f"{name}: distance between class centroids", fontsize=9)
        row[1].set_xlabel("class")
        row[1].set_ylabel("class")
        ticks = range(len(e["spread"]))
        row[1].set_xticks(ticks)
        row[1].set_yticks(ticks)
        fig.colorbar(im, ax=row[1], label="in units of overall spread")
    fig.tight_layout()
    return fig
