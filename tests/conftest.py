"""Shared pytest set-up: the `backend` and `gen` fixtures, and the `gpu` marker that skips
where CUDA is absent."""
import pytest
import torch

from helpers import backend, gen  # noqa: F401  (fixtures shared by the test files)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
