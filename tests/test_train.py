import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dlcore import models
from dlcore.train import RESUME, TrainConfig, get_lr, train


@pytest.fixture(scope="module")
def small(mnist):
    """Real MNIST, cut to 3,000 training and 1,000 test images to keep the tests quick."""
    return replace(mnist, x_train=mnist.x_train[:3000], y_train=mnist.y_train[:3000],
                   x_test=mnist.x_test[:1000], y_test=mnist.y_test[:1000])


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(steps=40, eval_every=10, batch_size=32, val_size=500, threads=1, out_dir=str(tmp_path))
    return TrainConfig(**{**base, **kw})


def test_classifier_reports_each_eval_and_keeps_best_checkpoint(small, tmp_path):
    calls = []
    final = train(cfg(tmp_path, labels=100, lr=3e-3), lambda m, c: calls.append((dict(m), c)), small)
    evals = [m for m, _ in calls[:-1]]
    assert [m["step"] for m in evals] == [0, 10, 20, 30, 40]  # step 0: the untrained model, a point on every curve
    assert "train_loss" not in evals[0] and {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(evals[1])
    best = max(evals, key=lambda m: m["val_acc"])  # first best wins ties
    assert final["best_step"] == best["step"] and final["best_val_acc"] == best["val_acc"]
    # a checkpoint is handed over exactly when validation improved, and with the final report
    running = -1.0
    for m, c in calls[:-1]:
        assert (c is not None) == (m["val_acc"] > running)
        running = max(running, m["val_acc"])
    assert calls[-1][1] is not None and "test_acc" in calls[-1][0]
    assert final["train_size"] == 100
    # every evaluation says what the run reads, so a run stopped early still places its read-off budgets
    assert all(m["labels_train"] + m["labels_val"] == final["labels_total"] for m in evals)
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == final["best_step"]
    assert len(json.loads((tmp_path / "checkpoint" / "history.json").read_text())) == 5


def test_same_seed_same_result_bit_for_bit(small, tmp_path):
    a = train(cfg(tmp_path / "a", labels=100, seed=1), data=small)
    b = train(cfg(tmp_path / "b", labels=100, seed=1), data=small)
    c = train(cfg(tmp_path / "c", labels=100, seed=2), data=small)
    sa = models.load_state(str(tmp_path / "a" / "checkpoint" / "model.pt"))
    sb = models.load_state(str(tmp_path / "b" / "checkpoint" / "model.pt"))
    sc = models.load_state(str(tmp_path / "c" / "checkpoint" / "model.pt"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["test_loss"] == b["test_loss"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


class Lost(Exception):
    """The node a run was on went away."""


@pytest.mark.parametrize("objective, kw", [("classify", {"labels": 200, "augment": "crop_flip", "lr": 3e-3}),
                                           ("autoencoder", {"noise_std": 0.3})])
def test_a_run_continued_from_its_last_reported_checkpoint_ends_exactly_as_if_never_stopped(small, tmp_path, objective, kw):
    """A trial restarted after its node was lost continues from the last checkpoint it reported:
    weights, optimizer, data order and the augmentation's and noise's random state, so it ends bit for
    bit where the run that never stopped ends, reporting only the evaluations it had not yet reported."""
    kw = {**kw, "objective": objective, "steps": 60, "eval_every": 10, "resume_every_s": 0}
    whole_calls = []
    whole = train(cfg(tmp_path / "whole", **kw), lambda m, c: whole_calls.append(m), small)
    saved = tmp_path / "saved"

    def report(metrics, checkpoint):
        if metrics["step"] == 30:
            assert checkpoint is not None  # resume_every_s 0: every evaluation hands over a checkpoint
            shutil.copytree(checkpoint, saved)  # what Tune persists
            raise Lost

    with pytest.raises(Lost):
        train(cfg(tmp_path / "first", **kw), report, small)
    assert (saved / RESUME).exists()
    calls = []
    again = train(cfg(tmp_path / "again", **kw), lambda m, c: calls.append(m), small, resume=str(saved))
    assert [m["step"] for m in calls[:-1]] == [40, 50, 60]
    assert [m["val_loss"] for m in calls[:-1]] == [m["val_loss"] for m in whole_calls[4:-1]]
    assert again["resumed_from_step"] == 30 and "resumed_from_step" not in whole
    assert again["test_loss"] == whole["test_loss"] and again["best_step"] == whole["best_step"]
    a = models.load_state(str(tmp_path / "whole" / "checkpoint" / "model.pt"))
    b = models.load_state(str(tmp_path / "again" / "checkpoint" / "model.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "again" / "checkpoint" / "history.json").read_text())
    assert [m["step"] for m in history] == [0, 10, 20, 30, 40, 50, 60]  # the whole run's, for its curves
    assert not (tmp_path / "again" / "checkpoint" / RESUME).exists()  # a finished run keeps only its selection


def test_autoencoder_loss_falls_and_dae_keeps_noisy_samples(small, tmp_path):
    history = []
    train(cfg(tmp_path, objective="autoencoder", noise_std=0.5, steps=60, lr=3e-3), lambda m, c: history.append(m), small)
    assert history[-2]["val_loss"] < 0.8 * history[0]["val_loss"]
    samples = torch.load(tmp_path / "checkpoint" / "samples.pt", weights_only=True)
    assert samples["clean"].shape == samples["input"].shape == samples["output"].shape == (64, 1, 28, 28)
    assert (samples["input"] - samples["clean"]).abs().mean() > 0.2  # noise std 0.5, clamped to [0, 1]


def test_mlp_dae_uses_l2_when_asked(small, tmp_path):
    final = train(cfg(tmp_path, objective="autoencoder", encoder="mlp", recon_loss="l2", noise_std=0.5), data=small)
    assert final["test_loss"] < 0.2


def pretrained_encoder(small, tmp_path):
    train(cfg(tmp_path / "ae", objective="autoencoder", steps=20), data=small)
    return str(tmp_path / "ae" / "checkpoint" / "encoder.pt")


@pytest.mark.parametrize("mode, changes", [("frozen", False), ("linear", False), ("full", True)])
def test_finetune_modes_freeze_or_train_the_encoder(small, tmp_path, mode, changes):
    path = pretrained_encoder(small, tmp_path)
    train(cfg(tmp_path / "ft", labels=100, init_encoder=path, finetune=mode, encoder_lr=1e-4), data=small)
    before = models.load_state(path)
    after = models.load_state(str(tmp_path / "ft" / "checkpoint" / "encoder.pt"))
    same = all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert same != changes
    head = models.load_state(str(tmp_path / "ft" / "checkpoint" / "model.pt"))
    assert ("head.weight" in head) == (mode == "linear")


def test_linear_probe_on_conv_features_reads_the_flattened_map_and_keeps_the_encoder(small, tmp_path):
    path = pretrained_encoder(small, tmp_path)  # conv encoder, default channels (32, 64): 64 x 7 x 7 before the FC
    final = train(cfg(tmp_path / "probe", labels=100, init_encoder=path, finetune="linear", features="conv"), data=small)
    state = models.load_state(str(tmp_path / "probe" / "checkpoint" / "model.pt"))
    assert state["head.weight"].shape == (10, 64 * 7 * 7)
    before, after = models.load_state(path), models.load_state(str(tmp_path / "probe" / "checkpoint" / "encoder.pt"))
    assert set(after) < set(before)  # the conv blocks only: the FC layer is not read
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert 0.1 < final["test_acc"] <= 1.0
    with pytest.raises(ValueError, match="features 'conv'"):
        TrainConfig(encoder="mlp", features="conv")


def test_a_linear_probe_without_a_pretrained_encoder_probes_its_random_initialisation(small, tmp_path):
    """Its weights stay as drawn; its BatchNorm statistics, never fitted, are fitted to the data."""
    train(cfg(tmp_path, labels=100, finetune="linear", seed=3), data=small)
    torch.manual_seed(3)
    init = models.build_encoder("conv", (1, 28, 28)).state_dict()
    after = models.load_state(str(tmp_path / "checkpoint" / "encoder.pt"))
    stats = {k for k in init if "running_" in k or "num_batches" in k}
    assert stats and all(torch.equal(init[k], after[k]) for k in set(init) - stats)
    assert not torch.equal(init["0.1.running_var"], after["0.1.running_var"])


def test_decode_trains_a_decoder_on_a_frozen_encoder(small, tmp_path):
    path = pretrained_encoder(small, tmp_path)
    final = train(cfg(tmp_path / "dec", objective="decode", init_encoder=path), data=small)
    after = models.load_state(str(tmp_path / "dec" / "checkpoint" / "encoder.pt"))
    before = models.load_state(path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "test_loss" in final and (tmp_path / "dec" / "checkpoint" / "samples.pt").exists()


@pytest.mark.parametrize("objective", ["simclr", "barlow"])
def test_ssl_objectives_report_knn_accuracy(cifar10, tmp_path, objective):
    tiny = replace(cifar10, x_train=cifar10.x_train[:1200], y_train=cifar10.y_train[:1200],
                   x_test=cifar10.x_test[:200], y_test=cifar10.y_test[:200])
    history = []
    c = cfg(tmp_path, objective=objective, steps=20, eval_every=10, val_size=200, normalize=True, proj_hidden=64,
            encoder_args={"channels": [16, 32], "latent_dim": 32})
    final = train(c, lambda m, ck: history.append(m), tiny)
    assert c.metric == "val_loss" and "val_knn_acc" not in history[0]  # label-free by default
    assert final["labels_total"] == 0

    history = []
    final = train(replace(c, knn_monitor=True, knn_bank=500), lambda m, ck: history.append(m), tiny)
    assert 0 <= history[0]["val_knn_acc"] <= 1
    assert history[0]["val_knn_acc"] > 0.12  # above chance (0.1) already: raw conv features carry signal
    assert final["labels_monitor"] == 500 + 200 == final["labels_total"]  # bank and validation labels, counted


def test_threads_and_lr_schedule(small, tmp_path):
    train(cfg(tmp_path, steps=10, threads=1), data=small)
    assert torch.get_num_threads() == 1
    c = TrainConfig(steps=100, warmup_steps=10, schedule="cosine")
    assert get_lr(0, c) == pytest.approx(0.1) and get_lr(9, c) == pytest.approx(1.0)
    assert get_lr(10, c) == pytest.approx(1.0) and get_lr(99, c) < 0.01
    assert get_lr(50, TrainConfig(steps=100)) == 1.0


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="known"):
        TrainConfig(objective="mae")
    with pytest.raises(ValueError, match="init_encoder"):
        TrainConfig(objective="decode")


def test_training_core_imports_neither_ray_nor_mlflow():
    code = "import sys, dlcore.train, dlcore.data, dlcore.models, dlcore.losses; print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_step_budgets_read_off_one_run_equal_separate_runs(small, tmp_path):
    """Under a constant schedule, the 20- and 30-step results read off a 40-step run are exactly the
    results of separate 20- and 30-step runs with the same seed: same selected step, same test metrics."""
    for protocol in ("realistic", "oracle"):
        results = []
        long = train(cfg(tmp_path / protocol, labels=100, validation=protocol, step_budgets=[20, 30]),
                     lambda m, c: results.append(m), small)
        read = {k: v for m in results for k, v in m.items() if k.startswith("at")}
        for steps in (20, 30):
            alone = train(cfg(tmp_path / f"{protocol}{steps}", labels=100, validation=protocol, steps=steps), data=small)
            assert read[f"at{steps}/best_step"] == alone["best_step"]
            assert read[f"at{steps}/best_val_acc"] == alone["best_val_acc"]
            assert read[f"at{steps}/test_acc"] == alone["test_acc"] and read[f"at{steps}/test_loss"] == alone["test_loss"]
        assert long["step"] == 40 and "at40/test_acc" not in read


def test_step_budget_off_the_evaluation_grid_is_evaluated(small, tmp_path):
    steps = []
    train(cfg(tmp_path, labels=100, step_budgets=[15]), lambda m, c: steps.append(m["step"]), small)
    assert steps[:-1] == [0, 10, 15, 20, 30, 40]
    with pytest.raises(ValueError, match="cosine"):
        cfg(tmp_path, step_budgets=[15], schedule="cosine")


def test_protocols_count_the_labels_they_read(small, tmp_path):
    realistic = train(cfg(tmp_path / "r", labels=100, validation="realistic"), data=small)
    assert realistic["labels_total"] == 100 == realistic["labels_train"] + realistic["labels_val"]
    assert 10 <= realistic["labels_val"] <= 25 and realistic["train_size"] == realistic["labels_train"]

    oracle = train(cfg(tmp_path / "o", labels=100, validation="oracle"), data=small)
    assert oracle["labels_train"] == 100 and oracle["labels_val"] == 500 and oracle["labels_total"] == 600

    history = []
    none = train(cfg(tmp_path / "n", labels=100, validation="none"), lambda m, c: history.append(m), small)
    assert none["labels_total"] == 100 and none["best_step"] == 40 and "best_val_acc" not in none
    assert not any(k.startswith("val_") for m in history for k in m)  # nothing was validated


def test_autoencoders_report_l1_and_l2_whatever_their_loss(small, tmp_path):
    l1 = train(cfg(tmp_path / "l1", objective="autoencoder", recon_loss="l1", steps=20), data=small)
    l2 = train(cfg(tmp_path / "l2", objective="autoencoder", recon_loss="l2", steps=20), data=small)
    assert l1["test_loss"] == pytest.approx(l1["test_l1"]) and l2["test_loss"] == pytest.approx(l2["test_l2"])
    assert 0 < l1["test_l2"] < l1["test_l1"] < 1 and 0 < l2["test_l2"] < l2["test_l1"] < 1  # pixels in [0, 1]


def test_a_normalised_autoencoder_reports_its_errors_in_pixel_units(small, tmp_path):
    """Normalised inputs train the loss on standardised pixels (~1/std times larger); test L1 and L2 stay
    per [0, 1] pixel, the units every other autoencoder reports in."""
    std = small.std[0]
    final = train(cfg(tmp_path, objective="autoencoder", recon_loss="l1", normalize=True, steps=20), data=small)
    assert final["test_l1"] == pytest.approx(final["test_loss"] * std, rel=1e-3)
    assert 0 < final["test_l2"] < final["test_l1"] < 1


def test_test_curve_is_logged_for_display_and_never_selects(small, tmp_path):
    history = []
    final = train(cfg(tmp_path, labels=100, test_curve=True), lambda m, c: history.append(m), small)
    curve = [m for m in history[:-1]]
    assert all("test_curve_acc" in m for m in curve) and "test_acc" not in curve[0]
    best = max(curve, key=lambda m: m["val_acc"])
    assert final["best_step"] == best["step"] and final["test_acc"] == best["test_curve_acc"]


def test_precision_auto_follows_the_hardware_and_bf16_keeps_accuracy(small, tmp_path):
    from dlcore.train import native_bf16, uses_bf16

    cpu = torch.device("cpu")
    caps = torch.cpu.get_capabilities()
    assert native_bf16(cpu) == bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16"))
    assert uses_bf16(TrainConfig(precision="auto"), cpu) == native_bf16(cpu)
    assert uses_bf16(TrainConfig(precision="bf16"), cpu) and not uses_bf16(TrainConfig(precision="fp32"), cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(precision="fp16")
    run = dict(labels=1000, steps=150, eval_every=50, lr=2e-3, val_size=500)
    fp32 = train(cfg(tmp_path / "fp32", precision="fp32", **run), data=small)
    bf16 = train(cfg(tmp_path / "bf16", precision="bf16", **run), data=small)
    assert fp32["train_bf16"] == 0.0 and bf16["train_bf16"] == 1.0
    assert fp32["test_acc"] > 0.8 and abs(bf16["test_acc"] - fp32["test_acc"]) < 0.03  # parity on real MNIST


def test_embedding_stats_by_hand():
    from dlcore.embeddings import embedding_stats

    z = torch.tensor([[-2.0, 1.0], [-2.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    e = embedding_stats(z, torch.tensor([0, 0, 1, 1]), 2)
    scale = 5 ** 0.5  # RMS distance to the mean (0, 0)
    assert e["scale"] == pytest.approx(scale)
    assert e["spread"].tolist() == pytest.approx([1 / scale, 1 / scale])
    assert e["centroid_dist"].flatten().tolist() == pytest.approx([0, 4 / scale, 4 / scale, 0], abs=1e-6)
    assert e["separation"] == pytest.approx(4.0) and e["projection"].shape == (4, 2)
    assert e["projection"][:, 0].abs().tolist() == pytest.approx([2 / scale] * 4)  # first axis: the class axis


def test_a_trained_classifier_separates_digits_more_than_its_untrained_encoder(small, tmp_path):
    stats = {}
    for steps in (1, 200):
        train(cfg(tmp_path / str(steps), labels=2000, steps=steps, eval_every=100, lr=2e-3, embeddings=True), data=small)
        stats[steps] = torch.load(tmp_path / str(steps) / "checkpoint" / "embeddings.pt", weights_only=True)
    assert stats[200]["separation"] > 1.5 * stats[1]["separation"]
    assert stats[200]["centroid_dist"].shape == (10, 10) and len(stats[200]["labels"]) == 1000  # the 1,000 test images


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizers_use_fused_kernels_on_the_cpu(optimizer):
    from dlcore.train import make_optimizer

    model = models.Classifier(models.build_encoder("mlp", (1, 28, 28)), models.mlp_head(128, 10))
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer))
    assert all(g["fused"] for g in opt.param_groups)
    model(torch.rand(4, 1, 28, 28)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_pixels_undoes_the_normalisation_of_a_channels_last_colour_batch():
    from dlcore import data as D
    from dlcore.train import Batcher

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    ds = D.Dataset(name="tiny", num_classes=2, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), x_train=images,
                   y_train=torch.zeros(4, dtype=torch.long), x_test=images, y_test=torch.zeros(4, dtype=torch.long))
    batcher = Batcher(ds, TrainConfig(objective="autoencoder", encoder="conv", normalize=True), torch.device("cpu"))
    x = batcher.plain(images)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[:, 2].mean().item() == pytest.approx(((D.to_float(images)[:, 2] - 0.6) / 0.3).mean().item(), abs=1e-5)
    assert torch.allclose(batcher.pixels(x), D.to_float(images), atol=1e-6)
