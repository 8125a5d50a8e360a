"""Paths for the mmdet plug-in tests: kdops_mmdet from the source tree until `pip install -e .`
has installed it, and this folder's helpers (mmdet_testing.py)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.abspath(os.path.join(HERE, "..", "..", "..", "integrations", "mmdet"))
for p in (HERE, PLUGIN):
    if p not in sys.path:
        sys.path.insert(0, p)
