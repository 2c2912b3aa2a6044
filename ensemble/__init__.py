"""Fusion of detections across models and test-time views: Soft-NMS, NMS, Weighted Boxes Fusion."""

from .fusion import nms, soft_nms, weighted_boxes_fusion

__all__ = ["soft_nms", "nms", "weighted_boxes_fusion"]
