import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is (``pytest -m gpu`` on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
