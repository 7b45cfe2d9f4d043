"""Training throughput of dlcore against the course-notebook way (ToTensor + DataLoader), on real MNIST.

    DLSWEEP_DATA_DIR=../shared/data .venv/bin/python bench/bench_core.py

Prints samples/s of conv-autoencoder pretraining and the wall time of a whole few-label
fine-tune (100 labels, batch 64, 500 steps, then the 10,000 test images), both ways, and
their ratios. Both ways train the same dlcore model with the same optimizer and threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from dlcore import data as D
from dlcore import losses, models
from dlcore.train import TrainConfig, train


class NotebookMNIST(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per item: PIL image from the uint8 array, then transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y, self.transform = x, y, transforms.ToTensor()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i], mode="L")), int(self.y[i])


def notebook_steps(model, loader: DataLoader, loss_fn, steps: int) -> None:
    """The epoch loop of a course notebook, cut off after ``steps`` optimizer steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    done = 0
    while done < steps:
        for xb, yb in loader:
            loss = loss_fn(model, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


def notebook_autoencoder(x: np.ndarray, y: np.ndarray, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = models.Autoencoder(models.conv_encoder((1, 28, 28)), models.conv_decoder((1, 28, 28)))
    loader = DataLoader(NotebookMNIST(x, y), batch_size=batch, shuffle=True, drop_last=True)
    t0 = time.perf_counter()
    notebook_steps(model, loader, lambda m, xb, yb: losses.l1(m(xb), xb), steps)
    return steps * batch / (time.perf_counter() - t0)


def notebook_finetune(x, y, xt, yt, steps: int, labels: int) -> tuple[float, float]:
    """The whole run: pick 100 labelled images, train 500 steps, evaluate on the test set."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train_set = torch.utils.data.Subset(NotebookMNIST(x, y), np.random.default_rng(0).permutation(len(x))[:labels])
    model = models.Classifier(models.conv_encoder((1, 28, 28)), models.mlp_head(12, 10))
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    notebook_steps(model, loader, lambda m, xb, yb: F.cross_entropy(m(xb), yb), steps)
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in DataLoader(NotebookMNIST(xt, yt), batch_size=64):
            correct += (model(xb).argmax(1) == yb).sum().item()
    return time.perf_counter() - t0, correct / len(xt)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DLSWEEP_DATA_DIR", "../shared/data"))
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = D.load_dataset("mnist", args.data_dir)
    x, y = ds.x_train[:, 0].numpy(), ds.y_train.numpy()
    xt, yt = ds.x_test[:, 0].numpy(), ds.y_test.numpy()
    out = tempfile.mkdtemp()

    base = dict(threads=args.threads, out_dir=out, val_size=5000)
    ae = TrainConfig(objective="autoencoder", steps=args.ae_steps, batch_size=128, eval_every=args.ae_steps, **base)
    history = []
    train(ae, lambda metrics, ckpt: history.append(metrics), ds)
    ours_ae_sps = history[0]["samples_per_s"]  # training steps only, as the DataLoader figure
    nb_ae_sps = notebook_autoencoder(x, y, args.ae_steps, 128)

    t0 = time.perf_counter()
    ft = TrainConfig(objective="classify", labels=100, steps=500, batch_size=64, eval_every=500, **base)
    ours_ft = train(ft, data=D.load_dataset("mnist", args.data_dir))  # load included, as the notebook's is
    ours_ft_s = time.perf_counter() - t0
    nb_ft_s, nb_acc = notebook_finetune(x, y, xt, yt, 500, 100)

    print(f"threads: {args.threads}, torch {torch.__version__}")
    print(f"conv AE pretraining, batch 128, {args.ae_steps} steps (samples/s):")
    print(f"  dlcore     {ours_ae_sps:8.0f}")
    print(f"  DataLoader {nb_ae_sps:8.0f}")
    print(f"  ratio      {ours_ae_sps / nb_ae_sps:8.2f}x")
    print("few-label fine-tune, 100 labels, batch 64, 500 steps + test on 10,000 (wall s, end to end):")
    print(f"  dlcore     {ours_ft_s:8.2f}  (test acc {ours_ft['test_acc']:.3f})")
    print(f"  DataLoader {nb_ft_s:8.2f}  (test acc {nb_acc:.3f})")
    print(f"  ratio      {nb_ft_s / ours_ft_s:8.2f}x")


if __name__ == "__main__":
    main()
