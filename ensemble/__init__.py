"""Fusion of detections across models and test-time views: Soft-NMS, NMS, Weighted Boxes Fusion.

    from twopass.ensemble import soft_nms, nms, weighted_boxes_fusion, fuse

Imported on first use, so that `twopass --help` (which imports `ensemble.cli`) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fusion import nms, soft_nms, weighted_boxes_fusion
    from .table_fusion import fuse

__all__ = ["soft_nms", "nms", "weighted_boxes_fusion", "fuse"]
_HOME = {"soft_nms": "fusion", "nms": "fusion", "weighted_boxes_fusion": "fusion", "fuse": "table_fusion"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
