import json

import numpy as np
import pytest

from twopass.pipeline.evaluate import STAT_NAMES, evaluate
from twopass.pipeline.tables import TableMeta, from_coco_results, write_table


def perturbed(gt, seed=0):
    """Results derived from ground truth: jittered boxes, dropped and relabelled objects, false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 1.5, 4)
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 9))
        out.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                    "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                    "segmentation": a["segmentation"]})
        if rng.random() < 0.3:  # a false positive elsewhere, with another object's mask
            other = gt["annotations"][int(rng.integers(len(gt["annotations"])))]
            out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random() * 0.5),
                        "bbox": other["bbox"], "segmentation": other["segmentation"]})
    return out


def test_same_numbers_as_pycocotools(synth_small):
    gt = json.loads((synth_small / "annotations.json").read_text())
    res = perturbed(gt)
    ours = evaluate(synth_small / "annotations.json", res, backend="faster")
    ref = evaluate(synth_small / "annotations.json", res, backend="pycocotools")
    for t in ("bbox", "segm"):
        for k in STAT_NAMES:
            assert ours[t][k] == pytest.approx(ref[t][k], abs=1e-12), (t, k)
        assert ours["per_category"][t] == pytest.approx(ref["per_category"][t], nan_ok=True)
    assert 0.2 < ours["bbox"]["AP"] < 0.95  # the perturbation really costs AP


@pytest.mark.parametrize("form", ["bytes", "uncompressed", "polygon"])
def test_other_mask_formats_same_numbers_as_pycocotools(synth_small, form):
    """Compressed RLE strings skip the library's mask conversion; every other form of a COCO
    result's mask goes through it and scores the same."""
    from pycocotools import mask as mask_utils

    gt = json.loads((synth_small / "annotations.json").read_text())
    res = perturbed(gt, seed=2)
    for r in res[::2]:  # half of them in the other form: a mixed list takes the library's path
        rle = r["segmentation"]
        if form == "bytes":
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].encode()}
        elif form == "uncompressed":
            m = mask_utils.decode(rle).ravel(order="F")
            change = np.flatnonzero(np.diff(np.concatenate([[0], m, [1 - m[-1]]])))  # run boundaries
            r["segmentation"] = {"size": rle["size"], "counts": np.diff(np.concatenate([[0], change])).tolist()}
        else:
            x, y, w, h = r["bbox"]
            r["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    ours = evaluate(gt, res)
    assert ours == evaluate(gt, res, backend="pycocotools")
    same_masks = form != "polygon"  # bytes and uncompressed RLE hold the very masks of the strings
    assert (ours["segm"]["AP"] == evaluate(gt, perturbed(gt, seed=2))["segm"]["AP"]) == same_masks


def test_ground_truth_scores_one_and_parquet_input(synth_small, tmp_path):
    gt = json.loads((synth_small / "annotations.json").read_text())
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
            "segmentation": a["segmentation"]} for a in gt["annotations"]]
    table = from_coco_results(res, source="gt")
    write_table(tmp_path / "gt.parquet", table, TableMeta(kind="instances", producer="test"))
    m = evaluate(synth_small / "annotations.json", tmp_path / "gt.parquet")
    assert m["bbox"]["AP"] == 1.0 and m["segm"]["AP"] == 1.0
    assert all(v == 1.0 for v in m["per_category"]["segm"].values())
    # boxes only: no segm entry
    boxes_only = evaluate(synth_small / "annotations.json", table.drop(["mask_height", "mask_width", "mask_counts"]))
    assert "segm" not in boxes_only and boxes_only["bbox"]["AP"] == 1.0


def test_empty_results_and_bad_ids(synth_small):
    m = evaluate(synth_small / "annotations.json", [])
    assert m["bbox"]["AP"] == 0.0 and m["segm"]["AP"] == 0.0
    bad = [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]
    with pytest.raises(ValueError, match="result 0 is on image_id 999"):
        evaluate(synth_small / "annotations.json", bad)
    bad[0].update(image_id=1, category_id=42)
    with pytest.raises(ValueError, match=r"result 0 \(image_id 1\) has unknown category_id 42"):
        evaluate(synth_small / "annotations.json", bad)


def test_class_agnostic_scores_relabelled_results_as_one_category(synth_small):
    gt = json.loads((synth_small / "annotations.json").read_text())
    res = perturbed(gt, seed=1)
    ours = evaluate(gt, res, class_agnostic=True)
    assert ours == evaluate(gt, res, class_agnostic=True, backend="pycocotools")
    one = {**gt, "categories": [{"id": 1, "name": "object"}], "annotations": [{**a, "category_id": 1} for a in gt["annotations"]]}
    relabelled = evaluate(one, [{**r, "category_id": 1} for r in res])
    for t in ("bbox", "segm"):
        for k in STAT_NAMES:
            assert ours[t][k] == pytest.approx(relabelled[t][k], abs=1e-12), (t, k)
    assert ours["bbox"]["AP"] > evaluate(gt, res)["bbox"]["AP"] + 0.02  # the wrong labels cost AP
    assert ours["per_category"] == {}
