"""Second stage: box heads (one stage or a Cascade R-CNN) and an optional mask branch.

Subclasses torchvision's RoIHeads to reuse its proposal matching, sampling, mask loss and
mask inference; overrides `forward` because torchvision's pools RoIs itself through one
`box_roi_pool`, whereas the Location Sensitive head pools from its own thin maps, and a
cascade runs several box stages. Frames: proposals and outputs are XYXY in input-batch pixels
(the model's transform maps them back to original-image pixels).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from .heads import LevelPooler
from .tv_private import BoxCoder, Matcher, maskrcnn_loss


def fast_rcnn_loss(
    class_logits: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """torchvision's fastrcnn_loss, extended to class-agnostic deltas [R, 1, 4].

    class_logits [R, K + 1]; deltas [R, K + 1 or 1, 4]; labels and targets per image.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    cls_loss = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    cls_index = labels_all[pos] if deltas.shape[1] > 1 else torch.zeros_like(pos)
    box_loss = F.smooth_l1_loss(deltas[pos, cls_index], targets_all[pos], beta=1 / 9, reduction="sum")
    return cls_loss, box_loss / max(labels_all.numel(), 1)


class DetectorRoIHeads(RoIHeads):
    """Box stages (1 or 3, Cascade R-CNN) plus torchvision's mask branch when given.

    box_heads[s](features, proposals) -> [R, D]; box_predictors[s] -> (logits [R, K + 1],
    deltas [R, K + 1 or 1, 4]). Stage s matches at IoU `ious[s]`, encodes with
    `reg_weights[s]` and its losses are scaled by `stage_weights[s]`. `score_thresh`,
    `nms_thresh` and `detections_per_img` are the defaults of `forward`'s arguments of the same
    names (torchvision's constructor arguments); inference never writes them.
    """

    def __init__(
        self,
        box_heads: list[nn.Module],
        box_predictors: list[nn.Module],
        ious: list[float],
        stage_weights: list[float],
        reg_weights: list[list[float]],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_roi_pool: Optional[LevelPooler] = None,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
        mask_feature_names: Optional[list[str]] = None,
        max_mask_positives: Optional[int] = None,
        mask_branch: Optional[nn.Module] = None,
        mask_loss_fn: Optional[Callable[..., dict[str, Tensor]]] = None,
    ):
        super().__init__(
            box_roi_pool=None,
            box_head=None,
            box_predictor=None,
            fg_iou_thresh=ious[0],
            bg_iou_thresh=ious[0],
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            bbox_reg_weights=tuple(reg_weights[0]),
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        n = len(box_heads)
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.stage_weights = list(stage_weights[:n])
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in ious[:n]]
        self.coders = [BoxCoder(tuple(w)) for w in reg_weights[:n]]
        self.mask_feature_names = mask_feature_names or []
        self.max_mask_positives = max_mask_positives
        # The segmenter plugs its own branch in: branch(feats, boxes) -> logits [R, K + 1, M, M],
        # and its own loss with maskrcnn_loss's arguments, returning a dict of losses.
        self.mask_branch = mask_branch
        self.mask_loss_fn = mask_loss_fn

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    # ----------------------------------------------------------------- cascade helpers

    def _refine(self, stage: int, deltas: Tensor, logits: Tensor, proposals: list[Tensor], image_shapes) -> list[Tensor]:
        """Stage `stage`'s boxes as the next stage's proposals (detached, clipped).

        Class-specific deltas: the box of the best foreground class."""
        boxes = self.coders[stage].decode(deltas.detach().flatten(1), proposals)  # [R, C, 4]
        if boxes.shape[1] > 1:
            best = logits.detach()[:, 1:].argmax(dim=1) + 1
            boxes = boxes[torch.arange(boxes.shape[0], device=boxes.device), best]
        else:
            boxes = boxes[:, 0]
        out = []
        for b, shape in zip(boxes.split([len(p) for p in proposals]), image_shapes):
            out.append(box_ops.clip_boxes_to_image(b, shape))
        return out

    def _label(self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Match refined proposals to the ground truth at stage `stage`'s IoU (no resampling)."""
        matched_idxs, labels, reg_targets = [], [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(props.dtype)
            if gt.numel() == 0:
                m = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros_like(m)
                gt = props.new_zeros((1, 4))
            else:
                raw = self.matchers[stage](box_ops.box_iou(gt, props))
                m = raw.clamp(min=0)
                lab = t["labels"][m].to(torch.int64)
                lab[raw < 0] = 0
            matched_idxs.append(m)
            labels.append(lab)
            reg_targets.append(self.coders[stage].encode_single(gt[m], props))
        return matched_idxs, labels, reg_targets

    # ----------------------------------------------------------------- inference

    def postprocess_probs(
        self,
        probs: Tensor,
        boxes: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's postprocess_detections, but from probabilities [R, K + 1] and decoded
        boxes [R, K + 1 or 1, 4] (so cascade stages can be averaged), thresholding before
        clipping so boxes below the score threshold cost nothing; thresholds as arguments."""
        num_classes = probs.shape[1]
        out_boxes, out_scores, out_labels = [], [], []
        sizes = [len(p) for p in proposals]
        for b, s, shape in zip(boxes.split(sizes), probs.split(sizes), image_shapes):
            s = s[:, 1:]
            b = b[:, 1:] if b.shape[1] > 1 else b.expand(-1, num_classes - 1, 4)
            labels = torch.arange(1, num_classes, device=s.device).view(1, -1).expand_as(s)
            keep = torch.where(s.reshape(-1) > score_thresh)[0]
            b, s, labels = b.reshape(-1, 4)[keep], s.reshape(-1)[keep], labels.reshape(-1)[keep]
            b = box_ops.clip_boxes_to_image(b, shape)
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, nms_thresh)[:detections_per_img]
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
        *,
        score_thresh: Optional[float] = None,
        nms_thresh: Optional[float] = None,
        detections_per_img: Optional[int] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """features: p{l} maps; proposals: per image [R_i, 4] (input-batch pixels).
        Training: ({}, losses). Inference: ([{boxes, scores, labels[, masks]}], {}), kept by
        the thresholds given (None: the constructor's)."""
        losses: dict[str, Tensor] = {}
        result: list[dict[str, Tensor]] = []
        if self.training:
            assert targets is not None
            proposals, matched_idxs, labels, reg_targets = self.select_training_samples(proposals, targets)
            mask_proposals, mask_labels, mask_matched = proposals, labels, matched_idxs
            stage_props = proposals
            for s in range(self.num_stages):
                if s > 0:
                    _, labels, reg_targets = self._label(s, stage_props, targets)
                x = self.box_heads[s](features, stage_props)
                logits, deltas = self.box_predictors[s](x)
                cls_loss, box_loss = fast_rcnn_loss(logits, deltas, labels, reg_targets)
                suffix = "" if s == 0 else f"_s{s}"
                w = self.stage_weights[s]
                losses[f"loss_classifier{suffix}"] = cls_loss * w
                losses[f"loss_box_reg{suffix}"] = box_loss * w
                if s + 1 < self.num_stages:
                    stage_props = self._refine(s, deltas, logits, stage_props, image_shapes)
            if self.has_mask():
                losses.update(self._mask_loss(features, mask_proposals, mask_labels, mask_matched, targets))
            return result, losses

        stage_props = proposals
        probs_sum: Tensor | None = None
        for s in range(self.num_stages):
            x = self.box_heads[s](features, stage_props)
            logits, deltas = self.box_predictors[s](x)
            probs = F.softmax(logits, -1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            if s + 1 < self.num_stages:
                stage_props = self._refine(s, deltas, logits, stage_props, image_shapes)
        assert probs_sum is not None
        boxes = self.coders[-1].decode(deltas.flatten(1), stage_props)
        boxes, scores, labels = self.postprocess_probs(
            probs_sum / self.num_stages, boxes, stage_props, image_shapes,
            self.score_thresh if score_thresh is None else score_thresh,
            self.nms_thresh if nms_thresh is None else nms_thresh,
            self.detections_per_img if detections_per_img is None else detections_per_img,
        )  # fmt: skip
        result = [{"boxes": b, "labels": l, "scores": sc} for b, sc, l in zip(boxes, scores, labels)]
        if self.has_mask():
            masks = self.predict_masks(features, [r["boxes"] for r in result], [r["labels"] for r in result])
            for r, m in zip(result, masks):
                r["masks"] = m
        return result, losses

    # ----------------------------------------------------------------- mask branch

    def has_mask(self) -> bool:
        return self.mask_branch is not None or super().has_mask()

    def mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
        """Mask logits [R, K + 1, M, M] for boxes (input-batch pixels), float32 under autocast too."""
        feats = [features[n] for n in self.mask_feature_names]
        if self.mask_branch is not None:
            return self.mask_branch(feats, boxes).float()
        x = self.mask_roi_pool(feats, boxes)
        return self.mask_predictor(self.mask_head(x)).float()

    def predict_masks(self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Soft masks [R_i, 1, M, M] of each box's own class (labels [R_i], 1..K), boxes in
        input-batch pixels. torchvision's maskrcnn_inference, but the class channel is taken
        before the sigmoid (the same numbers, without a sigmoid over all K + 1 maps)."""
        if sum(len(b) for b in boxes) == 0:
            m = self.mask_branch.mask_size if self.mask_branch is not None else self.mask_roi_pool.output_size[0] * 2
            return [b.new_zeros((0, 1, m, m)) for b in boxes]
        logits = self.mask_logits(features, boxes)
        index = torch.arange(logits.shape[0], device=logits.device)
        probs = logits[index, torch.cat(labels)].sigmoid()[:, None]
        return list(probs.split([len(b) for b in boxes]))

    def _mask_loss(self, features, proposals, labels, matched_idxs, targets) -> dict[str, Tensor]:
        pos_props, pos_matched = [], []
        for props, lab, m in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            if self.max_mask_positives is not None and len(pos) > self.max_mask_positives:
                pos = pos[torch.randperm(len(pos), device=pos.device)[: self.max_mask_positives]]
            pos_props.append(props[pos])
            pos_matched.append(m[pos])
        logits = self.mask_logits(features, pos_props)
        args = (logits, pos_props, [t["masks"] for t in targets], [t["labels"] for t in targets], pos_matched)
        if self.mask_loss_fn is not None:
            return self.mask_loss_fn(*args)
        return {"loss_mask": maskrcnn_loss(*args)}
