import hashlib
import json

import numpy as np
import pytest

from twopass.pipeline.synth import CATEGORIES, DIFFICULTIES, generate, make_image

LEVELS = list(DIFFICULTIES)


def test_hard_is_the_original_generator_bit_for_bit(tmp_path):
    """`hard` is the generator from before the difficulty levels existed: the same pixels,
    masks and annotation file (digests taken from that generator)."""
    h = hashlib.sha256()
    for k in range(6):
        img, objects = make_image(128, 7, k, "hard")
        h.update(img.tobytes())
        for cat, vis, full in objects:
            h.update(bytes([cat]))
            h.update(vis.tobytes())
            h.update(full.tobytes())
    assert h.hexdigest() == "ba96af6486c1662198a36780263750d319fd5ba1eb0593b8ba59abca5bcf06f7"
    ann = generate(tmp_path / "hard", 3, 96, seed=7, difficulty="hard")
    assert hashlib.sha256(ann.read_bytes()).hexdigest() == "dd79ac357445bfb95198fa919c710b1f66fc448a6820f8f6bb1a4df4f9656aa3"


def test_levels_differ_and_standard_is_the_default(tmp_path):
    images = {level: make_image(96, 3, 0, level)[0] for level in LEVELS}
    assert len({im.tobytes() for im in images.values()}) == len(LEVELS)
    assert np.array_equal(make_image(96, 3, 0)[0], images["standard"])
    ann = json.loads(generate(tmp_path / "d", 1, 64, seed=0).read_text())
    assert "standard" in ann["info"]["description"]


def test_unknown_difficulty_is_named(tmp_path):
    with pytest.raises(ValueError, match="difficulty.*'medium'"):
        generate(tmp_path / "x", 1, 64, difficulty="medium")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("level", LEVELS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, level):
    a = generate(tmp_path / "a", 3, 96, seed=4, difficulty=level)
    b = generate(tmp_path / "b", 3, 96, seed=4, difficulty=level)
    c = generate(tmp_path / "c", 3, 96, seed=5, difficulty=level)
    assert a.read_text() == b.read_text() != c.read_text()
    for k in range(1, 4):
        name = f"images/{k:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # image k depends only on (seed, k): a longer set starts with the same images
    d = generate(tmp_path / "d", 5, 96, seed=4, difficulty=level)
    assert json.loads(d.read_text())["annotations"][:3] == json.loads(a.read_text())["annotations"][:3]


def _statistics(level: str, size: int = 256, n: int = 60):
    """Per-object areas and categories, and how many objects are occluded and cut by the border."""
    cats, areas, occluded, cut, per_image = [], [], 0, 0, []
    for k in range(n):
        _, objects = make_image(size, 11, k, level)
        per_image.append(len(objects))
        above = np.zeros((size, size), bool)
        for cat, vis, full in reversed(objects):  # top to bottom
            assert not (vis & above).any(), "visible masks must exclude what lies above"
            assert (vis <= full).all()
            if (full & above).any():
                occluded += 1
            ys, xs = np.nonzero(vis)
            if ys.min() == 0 or xs.min() == 0 or ys.max() == size - 1 or xs.max() == size - 1:
                cut += 1
            above |= full
            cats.append(cat)
            areas.append(vis.sum())
    return cats, np.array(areas), occluded, cut, per_image


@pytest.mark.parametrize("level", ["standard", "hard"])
def test_statistics_over_many_images(level):
    """standard keeps everything hard has that makes segmentation hard: sizes, counts,
    occlusion, border cuts, every outline."""
    cats, areas, occluded, cut, per_image = _statistics(level)
    total = len(areas)
    assert set(cats) == set(range(len(CATEGORIES))) and len(CATEGORIES) >= 6
    small, large = (areas < 32**2).mean(), (areas > 96**2).mean()
    assert 0.2 < small < 0.7 and 0.05 < large < 0.4 and 0.15 < 1 - small - large
    assert occluded / total > 0.15, "partial occlusion should be common"
    assert cut / total > 0.1, "objects cut by the border should be common"
    assert min(per_image) >= 2 and max(per_image) >= 10


def test_annotations_are_consistent(synth_small):
    data = json.loads((synth_small / "annotations.json").read_text())
    from pycocotools import mask as mask_utils

    assert [c["name"] for c in data["categories"]] == list(CATEGORIES)
    for a in data["annotations"]:
        assert a["area"] == mask_utils.area(a["segmentation"]) > 0
        np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(a["segmentation"]))


def test_easy_has_fewer_larger_objects():
    _, areas, _, _, per_image = _statistics("easy")
    _, std_areas, _, _, std_per_image = _statistics("standard")
    assert max(per_image) <= 5 and np.mean(per_image) < 0.6 * np.mean(std_per_image)
    assert np.median(areas) > 4 * np.median(std_areas) and (areas < 32**2).mean() < 0.05


def _contrast(level: str, n: int = 30) -> float:
    """Median, over objects, of how well an object's pixels separate from the ring of
    background pixels just outside it (no other object there): the distance of their mean
    colours over the spread of colours within each (a Fisher ratio)."""
    from PIL import Image, ImageFilter

    def dilate(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 0

    out = []
    for k in range(n):
        img, objects = make_image(128, 5, k, level)
        covered = np.zeros(img.shape[:2], bool)
        for _, _, full in objects:
            covered |= full
        for _, vis, full in objects:
            ring = dilate(full) & ~covered
            if vis.sum() >= 30 and ring.sum() >= 30:
                a, b = img[vis].astype(float), img[ring].astype(float)
                spread = np.linalg.norm(a.std(0)) + np.linalg.norm(b.std(0))
                out.append(np.linalg.norm(a.mean(0) - b.mean(0)) / max(spread, 1.0))
    return float(np.median(out))


def test_standard_objects_stand_out_from_their_background():
    easy, standard, hard = _contrast("easy"), _contrast("standard"), _contrast("hard")
    assert easy > standard > 2 * hard, (easy, standard, hard)


@pytest.mark.slow
def test_a_fixed_model_learns_easy_before_standard_before_hard(tmp_path):
    """The same small detector, the same schedule and seed on each level: box AP50 on held-out
    images of that level orders easy > standard > hard."""
    import torch

    from twopass.detector.config import ModelConfig
    from twopass.detector.infer import make_validator
    from twopass.detector.model import build_detector
    from twopass.detector.train import TrainOptions, train
    from twopass.pipeline.coco import CocoDataset

    cfg = ModelConfig.model_validate(
        dict(
            name="levels",
            backbone=dict(name="resnet18", fpn_channels=32, trainable_stages=5),
            norm=dict(backbone="bn", heads="gn", gn_groups=8),
            rpn=dict(anchors=dict(sizes=[8, 16, 32, 64, 128]), pre_nms_top_n_train=300, post_nms_top_n_train=150,
                     pre_nms_top_n_test=300, post_nms_top_n_test=100, batch_size_per_image=64),
            box_head=dict(type="location_sensitive", fc_dim=128, kernel_size=5, mid_channels=16, alpha=4,
                          batch_size_per_image=64, positive_fraction=0.5),
            input=dict(train_sizes=[128], test_size=128, max_size=128),
            train=dict(optimizer="adamw", base_lr=0.002, base_batch=8, warmup_iters=20, steps=[], clip_grad_norm=5.0),
        )
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    ap50 = {}
    try:
        for level in LEVELS:
            train_ann = generate(tmp_path / level / "train", 96, 128, seed=0, difficulty=level)
            val_ann = generate(tmp_path / level / "val", 24, 128, seed=1, difficulty=level)
            ds = CocoDataset(train_ann, train_ann.parent / "images", with_masks=False)
            torch.manual_seed(0)
            model = build_detector(cfg, ds.categories.num_classes)
            validate = make_validator(val_ann, val_ann.parent / "images", ds.categories, batch=8)
            opts = TrainOptions(out=tmp_path / level / "run", iters=200, batch=4, progress=False, checkpoint_every=10**6, seed=0)
            result = train(model, ds, opts, cfg.train, kind="detector", config=cfg.to_dict(), categories=ds.categories, validate=validate)
            ap50[level] = result.val["bbox"]["AP50"]
    finally:
        torch.set_num_threads(before)
    assert ap50["easy"] > ap50["standard"] > ap50["hard"], ap50
