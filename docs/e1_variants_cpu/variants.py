"""E1's CPU profile, the scratch arm at 100% of the labels: each variant of its settings x seeds 0-2,
trained by dlcore.train with the cell's own job (realistic validation: 1,800 of the 9,000 labels select
the checkpoint); variants are compared on best_val_acc, test_acc printed beside it.

    DLSWEEP_DATA_DIR=../shared/data python docs/e1_variants_cpu/variants.py [VARIANTS] [PARALLEL] [STEPS_CAP] [THREADS]
"""
import json, os, statistics, sys, tempfile, time, multiprocessing as mp
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
E = {"channels": [32, 64, 128], "latent_dim": 256}
VARIANTS = {
    "base": {},
    "wd0.05": {"weight_decay": 0.05},
    "wd0.3": {"weight_decay": 0.3},
    "norm": {"normalize": True},
    "lr2e-3": {"lr": 2e-3},
    "lr5e-4": {"lr": 5e-4},
    "head0": {"head_hidden": 0},
    "b128": {"batch_size": 128},
    "ch48": {"encoder_args": {**E, "channels": [48, 96, 192]}},
    "ch64": {"encoder_args": {**E, "channels": [64, 128, 256]}},
    "steps8000": {"steps": 8000, "step_budgets": [500, 1000, 2000, 4000]},
    "norm_wd0.05_lr2e-3": {"normalize": True, "weight_decay": 0.05, "lr": 2e-3},
    "norm_b128": {"normalize": True, "batch_size": 128},
    "norm_steps8000": {"normalize": True, "steps": 8000, "step_budgets": [500, 1000, 2000, 4000]},
}
DS = None

THREADS = 2


def init(data_dir, threads):
    global DS, THREADS
    THREADS = threads
    from dlcore import data as D
    DS = D.load_dataset("cifar10", data_dir)

def one(task):
    name, seed, args, steps_cap = task
    import torch
    from dlcore.train import TrainConfig, train
    a = {**args, **VARIANTS[name], "seed": seed}
    if steps_cap:
        a.update(steps=steps_cap, step_budgets=None, eval_every=max(1, steps_cap // 2))
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        f = train(TrainConfig(**a, threads=THREADS, out_dir=d), None, DS)
    keep = {k: v for k, v in f.items() if k in ("test_acc", "best_val_acc", "best_step", "train_bf16")}
    return name, seed, keep, time.time() - t

if __name__ == "__main__":
    from dlcore import spec
    data_dir = os.environ["DLSWEEP_DATA_DIR"]
    only = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else list(VARIANTS)
    par = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    cap = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    sweep = spec.load_sweep(ROOT / "sweeps/dae_fraction.yaml", [f"data.data_dir={data_dir}"], profile="cpu")
    job = next(c for c in spec.finetune_cells(sweep) if c.tags["arm"] == "scratch" and c.train["labels"] == 1.0)
    base = dict(job.train); base.pop("seed")
    # the profile as it was before these runs (4,000 steps, inputs not normalised): each variant sets what it changes
    base.update(normalize=False, steps=4000, step_budgets=[500, 1000, 2000])
    print({k: base[k] for k in ("steps", "lr", "weight_decay", "batch_size", "eval_every", "step_budgets", "encoder_args", "augment", "validation")}, flush=True)
    tasks = [(n, s, base, cap) for s in (0, 1, 2) for n in only]
    rows = {}
    with mp.get_context("spawn").Pool(par, initializer=init, initargs=(data_dir, threads)) as pool:
        for name, seed, f, wall in pool.imap_unordered(one, tasks):
            rows.setdefault(name, []).append(f)
            print(name, seed, f"{wall:.0f}s", json.dumps({k: round(v, 4) for k, v in f.items()}), flush=True)
    print("\nvariant              val_acc  test_acc  (mean of seeds)")
    for n in only:
        r = rows.get(n, [])
        m = lambda k: statistics.mean(x[k] for x in r) if r and all(k in x for x in r) else float("nan")
        print(f"{n:20s} {m('best_val_acc'):.4f}   {m('test_acc'):.4f}  n={len(r)}")
