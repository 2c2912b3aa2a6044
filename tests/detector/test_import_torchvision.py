"""torchvision's detection models imported as run folders give torchvision's own outputs.

For each architecture: torchvision's model with random weights (seeded), its state dict saved
as a `.pth`, imported by `twopass import-torchvision`, then both run on the same two images
(at the test size, in one batch). Boxes within 0.5 px, scores within 1e-4, the same
labels (as COCO ids), and for Mask R-CNN the same mask RLEs, from this project's `detect` and
from its pass two (`segment`) on torchvision's own boxes. These are the proof that the
baseline here is torchvision's Faster / Mask R-CNN, not a look-alike. The models run as
loaded (`fast=False`): the inference rewrite (`detector.speed`: BatchNorm folded, channels-last,
RoIAlign as a sparse product) reorders float sums, which moves a few scores of these random
networks by up to ~4e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from twopass.detector.api import detect_images, views_of
from twopass.segmenter.api import load_any
from twopass.detector.importer import ARCHS, import_torchvision
from twopass.pipeline.categories import Categories
from twopass.pipeline.cli import app
from twopass.pipeline.coco import ImageSet
from twopass.pipeline.coco_categories import coco_categories
from twopass.pipeline.settings import DetectSettings
from twopass.pipeline.tables import boxes_of, detections_table, rles_of

SIZE = 320  # test size of both models: small images keep a ResNet-50 quick on CPU
SCORE = 0.001  # this project's detection threshold (COCO practice), set on torchvision's side too
# Both at the test size, of different widths (the batch pads a); `RESIZED` below must be resized.
IMAGES = {"a.png": (SIZE, 400), "b.png": (SIZE, 448)}


def random_images(root, sizes: dict[str, tuple[int, int]], seed: int) -> ImageSet:
    """Noise images of the given (h, w) sizes, saved under `root`."""
    g = torch.Generator().manual_seed(seed)
    for name, (h, w) in sizes.items():
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / name)
    return ImageSet.from_folder(root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("images"), IMAGES, seed=3)


def torchvision_outputs(tv, image_set: ImageSet, ids: list[int] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    ids = ids or image_set.image_ids
    with torch.inference_mode():  # one batch, as `detect` runs them (batch 2): the same conv shapes
        return dict(zip(ids, tv([image_set.read(i).float() / 255 for i in ids])))


def imported(arch: str, tmp_path, num_outputs: int = 91):
    """(torchvision model at the test's size and score threshold, our run folder): every label a
    category (c1..c90, id == label), so no output is dropped."""
    torch.manual_seed(0)
    tv = ARCHS[arch].torchvision_model(num_outputs, min_size=SIZE, box_score_thresh=SCORE).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    (tmp_path / "cats.json").write_text(json.dumps([{"id": i, "name": f"c{i}"} for i in range(1, num_outputs)]))
    r = CliRunner().invoke(app, ["import-torchvision", "--arch", arch, "--weights", str(tmp_path / "tv.pth"),
                                 "--out", str(tmp_path / "run"), "--categories", str(tmp_path / "cats.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    return tv, tmp_path / "run"


def matched(got, w) -> np.ndarray:
    """For each of torchvision's detections, the row of `got` with its label and the nearest
    box (rows of equal score may come in either order)."""
    boxes, labels = boxes_of(got), got.column("category_id").to_numpy()
    order = []
    for box, label in zip(w["boxes"].numpy(), w["labels"].numpy()):
        d = np.abs(boxes - box).max(1) + np.where(labels == label, 0, np.inf)
        d[order] = np.inf
        order.append(int(d.argmin()))
    return np.asarray(order)


def masks_rles(masks: torch.Tensor) -> list[bytes]:
    """torchvision's pasted soft masks [N, 1, H, W] -> RLE counts at the 0.5 threshold."""
    binary = np.asfortranarray((masks[:, 0] > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
    return [r["counts"] for r in mask_util.encode(binary)]


# The default suite runs the first architecture; the others (20-35 s each on 2 cores) are slow.
ALL_ARCHS = [a if i == 0 else pytest.param(a, marks=pytest.mark.slow) for i, a in enumerate(ARCHS)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_import_gives_torchvisions_outputs(arch, images, tmp_path):
    tv, run = imported(arch, tmp_path)
    want = torchvision_outputs(tv, images)
    loaded = load_any(run, fast=False)
    assert loaded.meta.kind == ARCHS[arch].kind and loaded.meta.iteration == 0
    with_masks = loaded.meta.kind == "segmenter"
    views = views_of(loaded.meta.path, [SIZE], False)
    table, _ = detect_images(loaded, images, views, DetectSettings(score_thresh=SCORE, max_per_image=100), with_masks=with_masks)
    total = 0
    for image_id, w in want.items():
        got = table.filter(np.asarray(table.column("image_id")) == image_id)
        assert got.num_rows == len(w["boxes"]) > 0
        got = got.take(matched(got, w))
        np.testing.assert_allclose(boxes_of(got), w["boxes"].numpy(), atol=0.5)
        np.testing.assert_allclose(got.column("score").to_numpy(), w["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(got.column("category_id").to_numpy(), w["labels"].numpy())  # id == label here
        if with_masks:
            assert [r["counts"] for r in rles_of(got)] == masks_rles(w["masks"])
        total += got.num_rows
    assert total > 50  # random weights, scores above 0.001: enough rows for the comparison to mean something


@pytest.mark.parametrize("arch", ["maskrcnn_resnet50_fpn", pytest.param("maskrcnn_resnet50_fpn_v2", marks=pytest.mark.slow)])
def test_segment_on_torchvisions_boxes_gives_torchvisions_masks(arch, images, tmp_path):
    """Pass two on torchvision's own detections of image a (alone on both sides: the padding
    of a batch changes the features near the padded border)."""
    from twopass.segmenter.api import segment_images

    tv, run = imported(arch, tmp_path)
    image_id = images.image_ids[0]
    w = torchvision_outputs(tv, images, [image_id])[image_id]
    dets = detections_table([image_id] * len(w["boxes"]), w["labels"].numpy(), w["scores"].numpy(), w["boxes"].numpy(), "tv")
    loaded = load_any(run, fast=False)
    table, _, _ = segment_images(loaded, images, dets, views_of(loaded.meta.path, [SIZE], False), image_ids=[image_id])
    assert table.num_rows == len(w["boxes"]) > 0
    assert [r["counts"] for r in rles_of(table)] == masks_rles(w["masks"])


def test_coco_categories_keep_the_coco_outputs(images, tmp_path):
    """`--categories coco` (the shipped list): 80 categories, real COCO ids, torchvision's
    outputs once the 10 unused ids have no probability (as in a COCO-trained model)."""
    arch = "fasterrcnn_resnet50_fpn"
    torch.manual_seed(0)
    tv = ARCHS[arch].torchvision_model(91, min_size=SIZE, box_score_thresh=SCORE).eval()
    cats = Categories.from_coco(coco_categories())
    unused = sorted(set(range(1, 91)) - set(cats.ids))
    assert len(cats.ids) == 80 and unused == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.bias[unused] = -1e4
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    r = CliRunner().invoke(app, ["import-torchvision", "--arch", arch, "--weights", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    loaded = load_any(tmp_path / "run", fast=False)
    assert loaded.meta.categories == cats and (tmp_path / "run" / "config.yaml").is_file()
    want = torchvision_outputs(tv, images)
    table, _ = detect_images(loaded, images, views_of(loaded.meta.path, [SIZE], False), DetectSettings(score_thresh=SCORE))
    for image_id, w in want.items():
        got = table.filter(np.asarray(table.column("image_id")) == image_id)
        got = got.take(matched(got, w))
        np.testing.assert_allclose(boxes_of(got), w["boxes"].numpy(), atol=0.5)
        np.testing.assert_allclose(got.column("score").to_numpy(), w["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(got.column("category_id").to_numpy(), w["labels"].numpy())


# Images that must be resized to the test size, one up (240 -> 320) and one down (400 -> 320):
# the imported model resizes after normalising, as torchvision does, so the outputs still agree.
RESIZED = {"up.png": (240, 300), "down.png": (400, 520)}


@pytest.fixture(scope="module")
def resized_images(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("resized"), RESIZED, seed=4)


def test_import_gives_torchvisions_outputs_on_images_it_resizes(resized_images, tmp_path):
    """Boxes, scores, labels and masks from `detect`, and masks from `segment` on torchvision's
    own boxes, on images the model resizes: torchvision's, as at the test size. Tighter than
    the test above: resizing before normalising (this project's own models' order) moved boxes
    by 0.004 px and scores by 4e-5 here (fasterrcnn_resnet50_fpn, CPU, 2026-12-06); torchvision's
    order gave identical numbers."""
    from twopass.segmenter.api import segment_images

    arch = "maskrcnn_resnet50_fpn"
    tv, run = imported(arch, tmp_path)
    want = torchvision_outputs(tv, resized_images)
    loaded = load_any(run, fast=False)
    assert loaded.torchvision_resize
    views = views_of(loaded.meta.path, [SIZE], False)
    table, _ = detect_images(loaded, resized_images, views, DetectSettings(score_thresh=SCORE), with_masks=True)
    total = 0
    for image_id, w in want.items():
        got = table.filter(np.asarray(table.column("image_id")) == image_id)
        assert got.num_rows == len(w["boxes"]) > 0
        got = got.take(matched(got, w))
        np.testing.assert_allclose(boxes_of(got), w["boxes"].numpy(), atol=1e-3, rtol=0)
        np.testing.assert_allclose(got.column("score").to_numpy(), w["scores"].numpy(), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(got.column("category_id").to_numpy(), w["labels"].numpy())
        assert [r["counts"] for r in rles_of(got)] == masks_rles(w["masks"])
        total += got.num_rows
    assert total > 50
    image_id = resized_images.image_ids[0]  # alone on both sides, as in the test at the test size
    w = torchvision_outputs(tv, resized_images, [image_id])[image_id]
    dets = detections_table([image_id] * len(w["boxes"]), w["labels"].numpy(), w["scores"].numpy(), w["boxes"].numpy(), "tv")
    segmented, _, _ = segment_images(loaded, resized_images, dets, views, image_ids=[image_id])
    assert [r["counts"] for r in rles_of(segmented)] == masks_rles(w["masks"])


def test_import_refuses_bad_inputs(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    args = ["import-torchvision", "--arch", "fasterrcnn_resnet50_fpn", "--weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "r1")]
    p = subprocess.run([sys.executable, "-m", "twopass.pipeline.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2 and "junk.pth: not a readable state dict" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="--arch 'retinanet': not importable"):
        import_torchvision("retinanet", tmp_path / "junk.pth", tmp_path / "r2")
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 1024)}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match="part.pth: does not fit torchvision's fasterrcnn_resnet50_fpn"):
        import_torchvision("fasterrcnn_resnet50_fpn", tmp_path / "part.pth", tmp_path / "r3")
    assert not (tmp_path / "r3" / "checkpoints").exists()
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 5, "name": "x", "label": 91}]))
    with pytest.raises(ValueError, match=r"cats.json: labels \[91\] outside the model's 1..90"):
        import_torchvision("fasterrcnn_resnet50_fpn", tmp_path / "part.pth", tmp_path / "r4", tmp_path / "cats.json")


def test_a_categories_entry_with_a_bad_id_or_label_is_named(tmp_path):
    from twopass.detector.importer import categories_with_labels

    for entry, message in (({"id": "x", "name": "cat"}, "categories[0] ('cat'): id 'x' is not an integer"),
                           ({"id": 3, "name": "cat", "label": "7"}, "categories[0] ('cat'): label '7' is not an integer")):  # fmt: skip
        (tmp_path / "cats.json").write_text(json.dumps([entry]))
        with pytest.raises(ValueError) as e:
            categories_with_labels(tmp_path / "cats.json", 91)
        assert str(e.value) == f"--categories {tmp_path / 'cats.json'}: {message}"


def test_import_onto_another_run_suggests_overwrite_only(tmp_path):
    from twopass.detector.api import claim_run_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iter": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError) as e:
        claim_run_folder(tmp_path / "run", resume=False, overwrite=False, resumable=False)
    assert str(e.value).endswith("holds another run; pass --overwrite to replace it")
