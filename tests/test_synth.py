import json

import numpy as np

from pipeline.synth import CATEGORIES, generate, make_image


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 3, 96, seed=4)
    b = generate(tmp_path / "b", 3, 96, seed=4)
    c = generate(tmp_path / "c", 3, 96, seed=5)
    assert a.read_text() == b.read_text() != c.read_text()
    for k in range(1, 4):
        name = f"images/{k:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    # image k depends only on (seed, k): a longer set starts with the same images
    d = generate(tmp_path / "d", 5, 96, seed=4)
    assert json.loads(d.read_text())["annotations"][:3] == json.loads(a.read_text())["annotations"][:3]


def test_statistics_over_many_images():
    size, n = 256, 60
    cats, areas, occluded, cut, per_image = [], [], 0, 0, []
    for k in range(n):
        _, objects = make_image(size, 11, k)
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
    areas = np.array(areas)
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
