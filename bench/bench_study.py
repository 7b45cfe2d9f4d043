"""E2's few-label study through `dlsweep run` against the same study as a plain course notebook.

    DLSWEEP_DATA_DIR=../shared/data .venv/bin/python bench/bench_study.py

The matched protocol: one conv autoencoder pretraining (3 epochs of the 55,000 pool images at batch
128, Adam 1e-3, L1), then label budgets 100/300/1,000 x scratch/pretrained x seeds 0-2, 500
fine-tune steps at batch 64, Adam 1e-3, no search, no validation, the last checkpoint tested once.
The notebook side is written the way a course notebook is: a torch ``Dataset`` that hands out PIL
images through ``ToTensor``, a ``DataLoader`` with 2 workers, the same models (dlcore.models), the
same labelled subsets and seeds, one step after another. Prints both wall times, their ratio, both
accuracy tables and, per cell, the paired difference (a seed is the same labelled images on both
sides) with its 95% interval; ``--seeds 10`` narrows those. Run it on an otherwise idle machine: it
measures wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cli_run import run_cli
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from dlcore import data as D
from dlcore import models
from dlcore.stats import paired_diff

ENCODER = {"channels": [32, 64], "latent_dim": 12}
BUDGETS, SEEDS, STEPS, VAL_SIZE = (100, 300, 1000), 3, 500, 5000
PRETRAIN_STEPS = 3 * 55_000 // 128


def study(data_dir: str, pretrain_steps: int, steps: int, seeds: int, pretrain_seed: int = 0, precision: str = "auto") -> dict:
    return {
        "name": "bench_study",
        "data": {"dataset": "mnist", "data_dir": data_dir, "val_size": VAL_SIZE},
        "validation": {"protocol": "none"},
        "pretrain": {"ae": {"objective": "autoencoder", "encoder": "conv", "encoder_args": ENCODER, "recon_loss": "l1",
                            "steps": pretrain_steps, "batch_size": 128, "lr": 1e-3, "eval_every": pretrain_steps,
                            "seeds": [pretrain_seed], "precision": precision}},
        "finetune": {"arms": {"scratch": {}, "pretrained": {"from": "ae", "finetune": "full"}}, "labels": list(BUDGETS),
                     "steps": [steps], "seeds": list(range(seeds)), "encoder": "conv", "encoder_args": ENCODER,
                     "head_hidden": 128, "batch_size": 64, "lr": 1e-3, "eval_every": steps, "samples": 1,
                     "precision": precision},
        "asha": {"enabled": False},
        "resources": {"cpu": 1},
    }


def run_dlsweep(tmp: Path, data_dir: str, pretrain_steps: int, steps: int, seeds: int, pretrain_seed: int,
                precision: str) -> tuple[float, dict]:
    launched, exited, client, exp = run_cli(study(data_dir, pretrain_steps, steps, seeds, pretrain_seed, precision), tmp)
    wall = exited - launched
    accs = {}
    for r in client.search_runs([exp], "tags.`dlsweep.stage` = 'finetune'", max_results=1000):
        t = r.data.tags
        accs[(t["dlsweep.arm"], int(t["dlsweep.labels"]), int(t["dlsweep.seed"]))] = r.data.metrics["test_acc"]
    children = [r for r in client.search_runs([exp], max_results=1000) if r.data.tags.get("mlflow.parentRunId")]
    finetunes = [r for r in children if r.data.tags.get("dlsweep.stage") == "finetune"]
    costs = {"to first trial s": min(r.info.start_time for r in children) / 1000 - launched,
             "after last trial s": exited - max(r.info.end_time for r in children) / 1000,
             "eval share of fine-tune trials": sum(r.data.metrics.get("eval_s", 0) for r in finetunes)
             / sum(r.data.metrics["wall_s"] for r in finetunes)}
    return wall, accs, costs


class NotebookMNIST(Dataset):
    """What torchvision.datasets.MNIST does per item: a PIL image, then the transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def forever(loader):
    while True:
        yield from loader


def run_notebook(data_dir: str, pretrain_steps: int, steps: int, seeds: int, pretrain_seed: int) -> tuple[float, dict]:
    from torchvision.transforms import ToTensor

    t0 = time.perf_counter()
    with np.load(Path(data_dir) / "mnist.npz") as z:
        x_train, y_train, x_test, y_test = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    train_set, test_set = NotebookMNIST(x_train, y_train, ToTensor()), NotebookMNIST(x_test, y_test, ToTensor())
    pool, _ = D.validation_split(len(y_train), VAL_SIZE, 0)  # the same pool as the sweep's
    shape = (1, 28, 28)

    torch.manual_seed(pretrain_seed)
    ae = models.Autoencoder(models.build_encoder("conv", shape, **ENCODER), models.build_decoder("conv", shape, **ENCODER))
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    batches = forever(DataLoader(Subset(train_set, pool.tolist()), batch_size=128, shuffle=True, num_workers=2,
                                 drop_last=True, persistent_workers=True))
    ae.train()
    for _ in range(pretrain_steps):
        x, _ = next(batches)
        loss = F.l1_loss(ae(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pretrained = ae.encoder.state_dict()

    test_loader = DataLoader(test_set, batch_size=1000, num_workers=2)
    accs = {}
    labels = torch.from_numpy(y_train.astype(np.int64))[pool]
    for arm in ("scratch", "pretrained"):
        for budget in BUDGETS:
            for seed in range(seeds):
                torch.manual_seed(seed)
                subset = pool[D.label_budget(labels, budget, seed, 10)].tolist()  # the sweep's labelled images
                encoder = models.build_encoder("conv", shape, **ENCODER)
                if arm == "pretrained":
                    encoder.load_state_dict(pretrained)
                model = models.Classifier(encoder, models.mlp_head(encoder.out_dim, 10, 128))
                opt = torch.optim.Adam(model.parameters(), 1e-3)
                loader = forever(DataLoader(Subset(train_set, subset), batch_size=64, shuffle=True, num_workers=2,
                                            drop_last=len(subset) >= 64, persistent_workers=True))
                model.train()
                for _ in range(steps):
                    x, y = next(loader)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                model.eval()
                correct = 0
                with torch.no_grad():
                    for x, y in test_loader:
                        correct += (model(x).argmax(1) == y).sum().item()
                accs[(arm, budget, seed)] = correct / len(test_set)
    return time.perf_counter() - t0, accs


def table(accs: dict) -> list[str]:
    rows = []
    for arm in ("scratch", "pretrained"):
        for budget in BUDGETS:
            vals = [v for (a, b, _), v in sorted(accs.items()) if (a, b) == (arm, budget)]
            rows.append(f"    {arm:10} {budget:>5,} labels  {np.mean(vals):.2%}  ({', '.join(f'{v:.3f}' for v in vals)})")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DLSWEEP_DATA_DIR", "../shared/data"))
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    p.add_argument("--steps", type=int, default=STEPS, help="fine-tune steps (smaller: a plumbing check, not the benchmark)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="fine-tune seeds per cell (the matched study has 3; more "
                   "narrow the accuracy comparison)")
    p.add_argument("--pretrain-seed", type=int, default=0, help="the autoencoder's seed, on both sides")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="dlsweep's precision (the notebook trains in fp32)")
    args = p.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-study-"))
    sweep_s, sweep_accs, costs = run_dlsweep(tmp, data_dir, args.pretrain_steps, args.steps, args.seeds, args.pretrain_seed,
                                             args.precision)
    note_s, note_accs = run_notebook(data_dir, args.pretrain_steps, args.steps, args.seeds, args.pretrain_seed)
    cores = len(os.sched_getaffinity(0))
    print(f"E2 few-label study, matched: 1 pretraining of {args.pretrain_steps} steps + {2 * len(BUDGETS) * args.seeds} "
          f"fine-tunes of {args.steps} steps; torch {torch.__version__}, {cores} cores")
    print(f"  dlsweep run            {sweep_s:7.1f} s")
    print(f"  notebook (DataLoader)  {note_s:7.1f} s")
    print(f"  ratio dlsweep / notebook {sweep_s / note_s:5.2f}x  (target <= 0.40x)")
    print(f"  dlsweep: command to the first trial's start {costs['to first trial s']:.1f} s, last trial's end to exit "
          f"{costs['after last trial s']:.1f} s (targets <= 3 s each); evaluation "
          f"{costs['eval share of fine-tune trials']:.0%} of the fine-tune trials' time (target <= 15%)")
    print("  test accuracy, dlsweep:")
    print("\n".join(table(sweep_accs)))
    print("  test accuracy, notebook:")
    print("\n".join(table(note_accs)))
    print("  dlsweep - notebook, per cell: mean of the paired differences (a seed is the same labelled images on both "
          "sides) and its 95% Student-t interval; the pretrained arm's rest on one autoencoder per side, whose draw no "
          "interval over fine-tune seeds covers:")
    below = []
    for arm in ("scratch", "pretrained"):
        for budget in BUDGETS:
            d = paired_diff({s: v for (a, b, s), v in sweep_accs.items() if (a, b) == (arm, budget)},
                            {s: v for (a, b, s), v in note_accs.items() if (a, b) == (arm, budget)})
            below += [(arm, budget)] if d.mean < 0 else []
            print(f"    {arm:10} {budget:>5,} labels  {d.mean * 100:+.2f} points  [{(d.mean - d.half_width) * 100:+.2f}, "
                  f"{(d.mean + d.half_width) * 100:+.2f}]  ({d.n} seeds)")
    print(f"  cells where dlsweep's mean accuracy is below the notebook's: {below or 'none'}")

if __name__ == "__main__":
    main()
