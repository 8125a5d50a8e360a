import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test the checkout the tests live in (not another editable install), and find helpers.py.
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    import torch

    if INTERPRET or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (make test runs them)")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)
