import hashlib

import numpy as np
import pytest
import torch

from dlcore import data as D


def test_mnist_loads_exact_official_arrays(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    md5 = hashlib.md5(mnist.x_train[:, 0].numpy().tobytes()).hexdigest()
    assert md5 == "6510e85a72c3e9475c492d559d3770d2"
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.num_classes == 10
    assert mnist.mean[0] == pytest.approx(0.130660, abs=1e-6)
    assert mnist.std[0] == pytest.approx(0.308108, abs=1e-6)


def test_cifar10_is_chw_with_published_channel_means(cifar10):
    assert cifar10.x_train.shape == (50000, 3, 32, 32)
    assert cifar10.x_train[0, 0, 0, :3].tolist() == [59, 43, 50]  # first red row of the first image
    assert cifar10.mean == pytest.approx((0.49139968, 0.48215841, 0.44653091), abs=1e-7)
    assert cifar10.std == pytest.approx((0.24703223, 0.24348513, 0.26158784), abs=1e-6)


def test_any_npz_by_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), y_train=np.arange(20, dtype=np.uint8) % 4,
             x_test=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), y_test=np.arange(6, dtype=np.uint8) % 4)
    ds = D.load_dataset(str(path))
    assert ds.name == "toy" and ds.image_shape == (1, 8, 8) and ds.num_classes == 4


def test_missing_dataset_is_one_line_error_saying_where(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "mnist.npz") in msg and "DLSWEEP_DATA_DIR" in msg
    with pytest.raises(D.DataError, match="unknown data set"):
        D.load_dataset("imagenet", tmp_path)


def test_npz_missing_arrays_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(D.DataError, match="missing arrays"):
        D.load_dataset(str(tmp_path / "bad.npz"))


def test_numpy_roundtrip_shares_memory(mnist):
    arrays = mnist.to_numpy()
    back = D.Dataset.from_numpy(arrays)
    assert back.x_train.data_ptr() == torch.from_numpy(arrays["x_train"]).data_ptr()
    assert back.mean == mnist.mean and torch.equal(back.y_test, mnist.y_test)


def test_select_classes_relabels_cat_dog(cifar10):
    catdog = D.select_classes(cifar10, [3, 5])
    assert len(catdog.y_train) == 10000 and len(catdog.y_test) == 2000
    assert catdog.num_classes == 2
    assert torch.equal(catdog.y_train.bincount(), torch.tensor([5000, 5000]))
    first = ((cifar10.y_train == 3) | (cifar10.y_train == 5)).nonzero()[0, 0]
    assert torch.equal(catdog.x_train[0], cifar10.x_train[first])
    assert catdog.y_train[0].item() == {3: 0, 5: 1}[cifar10.y_train[first].item()]
    others = D.select_classes(cifar10, [c for c in range(10) if c not in (3, 5)])
    assert len(others.y_train) == 40000
    with pytest.raises(D.DataError, match="not in"):
        D.select_classes(cifar10, [3, 12])


def test_validation_split_is_seeded_and_disjoint():
    pool, val = D.validation_split(1000, 100, seed=0)
    assert len(val) == 100 and len(pool) == 900
    assert len(set(pool.tolist()) | set(val.tolist())) == 1000
    assert torch.equal(val, D.validation_split(1000, 100, seed=0)[1])
    assert not torch.equal(val, D.validation_split(1000, 100, seed=1)[1])
    assert len(D.validation_split(1000, 0.2)[1]) == 200
    with pytest.raises(D.DataError):
        D.validation_split(1000, 1000)


def test_label_budgets_are_stratified_nested_and_seeded(mnist):
    y = mnist.y_train[:50000]
    b100 = D.label_budget(y, 100, seed=3, num_classes=10)
    b300 = D.label_budget(y, 300, seed=3, num_classes=10)
    b1000 = D.label_budget(y, 1000, seed=3, num_classes=10)
    assert set(b100.tolist()) <= set(b300.tolist()) <= set(b1000.tolist())
    assert len(set(b1000.tolist())) == 1000
    # stratified: each class within one label of its proportional share
    share = y.bincount().double() / len(y)
    for b in (b100, b300, b1000):
        counts = y[b].bincount(minlength=10).double()
        assert (counts - share * len(b)).abs().max() <= 1.0
    assert torch.equal(b100, D.label_budget(y, 100, seed=3, num_classes=10))
    assert not torch.equal(b100, D.label_budget(y, 100, seed=4, num_classes=10))
    assert len(D.label_budget(y, 0.01, seed=0, num_classes=10)) == 500


def test_realistic_budgets_contain_their_validation_stratified_nested_and_seeded(mnist):
    y = mnist.y_train[:50000]
    splits = {n: D.realistic_budget(y, n, seed=3, num_classes=10, fraction=0.2) for n in (100, 300, 1000, 0.05)}
    for n, (train, val) in splits.items():
        both = set(train.tolist()) | set(val.tolist())
        assert not set(train.tolist()) & set(val.tolist())
        assert both == set(D.label_budget(y, n, seed=3, num_classes=10).tolist())  # the budget, all of it
        per_class = y[val].bincount(minlength=10)
        assert per_class.min() >= 1 and (y[train].bincount(minlength=10) >= 1).all()
        # each class validates on floor(20%) of its budget images (at least one)
        budget_per_class = (y[train].bincount(minlength=10) + per_class)
        assert torch.equal(per_class, torch.clamp((0.2 * budget_per_class.double()).floor().long(), min=1))
    assert len(splits[1000][1]) in range(190, 211)  # ~20% of the budget
    for small, big in [(100, 300), (300, 1000)]:  # nested: both halves grow by adding images
        assert set(splits[small][0].tolist()) <= set(splits[big][0].tolist())
        assert set(splits[small][1].tolist()) <= set(splits[big][1].tolist())
    again = D.realistic_budget(y, 100, seed=3, num_classes=10, fraction=0.2)
    other = D.realistic_budget(y, 100, seed=4, num_classes=10, fraction=0.2)
    assert all(torch.equal(a, b) for a, b in zip(again, splits[100])) and not torch.equal(other[1], splits[100][1])


def test_realistic_budget_needs_two_labels_per_class(mnist):
    y = mnist.y_train[:50000]
    with pytest.raises(D.DataError, match=r"label budget 15 \(15 labels\) leaves class \d with 1 image.*two per class.*"
                                          r"(\d+) labels or more with this seed"):
        D.realistic_budget(y, 15, seed=0, num_classes=10, fraction=0.2)
    y = torch.tensor([0] * 100 + [1])
    with pytest.raises(D.DataError, match="no budget can"):
        D.realistic_budget(y, 50, seed=0, num_classes=2, fraction=0.2)


def test_every_class_present_at_the_smallest_budget():
    y = torch.tensor([0] * 1000 + [1] * 10 + [2] * 5)
    b = D.label_budget(y, 3, seed=0, num_classes=3)
    assert sorted(y[b].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("budget, match", [(70000, "exceeds"), (5, "smaller than the number of classes"), (1.5, "fraction")])
def test_impossible_budgets_are_clear_errors(mnist, budget, match):
    with pytest.raises(D.DataError, match=match):
        D.label_budget(mnist.y_train, budget, seed=0, num_classes=10)


def test_batch_augmentations_keep_shape_and_range(cifar10):
    x = D.to_float(cifar10.x_train[:64])
    g = torch.Generator().manual_seed(0)
    for name in D.AUGMENTATIONS:
        out = D.augmentation(name)(x, g)
        assert out.shape == x.shape
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6, name
    views = D.simclr_view(x, g), D.simclr_view(x, g)
    assert not torch.allclose(views[0], views[1])
    with pytest.raises(ValueError, match="known"):
        D.augmentation("mixup")


def test_crop_flip_moves_pixels_without_inventing_them():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).view(2, 1, 8, 8)
    g = torch.Generator().manual_seed(1)
    out = D.random_crop(x, 2, g)
    for i in range(2):  # every value comes from the same image (reflect padding only repeats pixels)
        assert set(out[i].flatten().tolist()) <= set(x[i].flatten().tolist())
    flipped = D.random_flip(x, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_grayscale_and_hue_roundtrip():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(D._hsv_to_rgb(D._rgb_to_hsv(x)), x, atol=1e-5)
    gray = D.random_grayscale(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_gaussian_noise_has_requested_std():
    x = torch.zeros(64, 1, 28, 28)
    noisy = D.gaussian_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert noisy.std().item() == pytest.approx(0.5, rel=0.02)
    assert noisy.mean().item() == pytest.approx(0.0, abs=0.01)
