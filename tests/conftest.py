"""Shared pytest set-up: the `backend` and `gen` fixtures, and the `gpu` marker that skips
where CUDA is absent."""
import os

import torch

# Without a GPU the Triton backend runs under its interpreter; it must be chosen before
# grove_kernels (and so triton) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import backend, gen  # noqa: F401,E402  (fixtures shared by the test files)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
