import os
from pathlib import Path

import pytest

from dlcore import data as D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> str:
    """Real MNIST/CIFAR-10 .npz files: DLSWEEP_DATA_DIR, or ../shared/data beside the repo."""
    d = Path(os.environ.get("DLSWEEP_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
    assert (d / "mnist.npz").is_file(), f"real data sets expected in {d}; set DLSWEEP_DATA_DIR"
    return str(d)


@pytest.fixture(scope="session")
def mnist(data_dir) -> D.Dataset:
    return D.load_dataset("mnist", data_dir)


@pytest.fixture(scope="session")
def cifar10(data_dir) -> D.Dataset:
    return D.load_dataset("cifar10", data_dir)
