"""The predictor (`twopass.TwoPass`, `twopass.Model`): the same rows as the CLI's stages on the
same images and runs, images in memory read as image files are, and the `Instances` record's
masks, filters, COCO and table forms and picture."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

import twopass
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import CocoIndex, DataError
from twopass.pipeline.config import PipelineConfigError, write_pipeline_config
from twopass.pipeline.devices import DeviceError
from twopass.pipeline.tables import detections_table, from_coco_results, instances_table, read_table
from twopass.pipeline.visualize import category_color


def cli(*args) -> None:
    from twopass.pipeline.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def assert_same_rows(got: pa.Table, expected: pa.Table) -> None:
    assert got.column_names == expected.column_names
    for name in got.column_names:
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name


def assert_same_as_cli(records: list, cli_table: pa.Table) -> None:
    """Every image's record holds the CLI's rows of that image, in the CLI's order."""
    assert sum(len(r) for r in records) == cli_table.num_rows > 0
    for r in records:
        assert_same_rows(r.to_table(), cli_table.filter(pc.equal(cli_table.column("image_id"), r.image_id)))


@pytest.fixture(scope="module")
def images(synth_small):
    """(paths, ids) of the synthetic set's images, as its annotations name them."""
    index = CocoIndex.load(synth_small / "annotations.json")
    return [synth_small / "images" / im["file_name"] for im in index.images], [int(im["id"]) for im in index.images]


def test_root_package_exposes_the_predictor_and_imports_nothing_heavy():
    from twopass.segmenter import predictor

    assert (twopass.TwoPass, twopass.Model, twopass.Instances) == (predictor.TwoPass, predictor.Model, predictor.Instances)
    with pytest.raises(AttributeError, match="module 'twopass' has no attribute 'Nope'"):
        twopass.Nope  # noqa: B018
    # `import twopass` (every command does) stays quick: the predictor loads torch on first use
    code = "import sys, twopass; print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("model, options", [("a", []), ("seg", ["--with-masks"])])
def test_model_gives_the_rows_of_twopass_detect(model, options, ckpts, synth_small, images, tmp_path):
    """A detector, and a segmenter end to end (its own masks), as `twopass detect` runs them."""
    paths, ids = images
    out = tmp_path / "cli.parquet"
    cli("detect", "--checkpoint", ckpts[model], "--images", synth_small / "images", "--ann", synth_small / "annotations.json",
        "--tta-scales", "64,80", "--tta-flip", "--max-per-image", 20, *options, "--out", out)  # fmt: skip
    predictor = twopass.Model.from_run(ckpts[model], tta={"scales": [64, 80], "flip": True}, settings={"max_per_image": 20})
    records = predictor(paths, image_ids=ids)
    assert [r.image_id for r in records] == ids
    assert_same_as_cli(records, read_table(out, "instances" if options else "detections")[0])
    assert records[0].has_masks == bool(options)
    assert {s for r in records for s in r.sources} == {f"{model}@64", f"{model}@64+flip", f"{model}@80", f"{model}@80+flip"}


def test_two_pass_gives_the_rows_of_detect_fuse_segment(config, ckpts, synth_small, images, tmp_path):
    """`TwoPass.from_config` = `twopass detect` per detector (its views), `twopass fuse`,
    `twopass segment` (its views) with the config's settings; the config's YAML file is read."""
    paths, ids = images
    cfg = config(synth_small, ckpts)
    yaml_path = write_pipeline_config(tmp_path / "pipeline.yaml", cfg)
    data = ["--images", synth_small / "images", "--ann", synth_small / "annotations.json"]
    dets = []
    for d in cfg.detectors:
        dets.append(tmp_path / f"det_{d.name}.parquet")
        tta = ["--tta-scales", ",".join(map(str, d.tta.scales)), *(["--tta-flip"] if d.tta.flip else [])] if d.tta.scales else []
        cli("detect", "--checkpoint", ckpts[d.name], *data, *tta, "--max-per-image", d.max_per_image, "--out", dets[-1])
    cli("fuse", *dets, "--images", synth_small / "annotations.json", "--source", "fused:wbf", "--out", tmp_path / "fused.parquet")
    s = cfg.segmenter
    cli("segment", "--checkpoint", ckpts["seg"], "--detections", tmp_path / "fused.parquet", *data,
        "--tta-scales", ",".join(map(str, s.tta.scales)), "--tta-flip", "--out", tmp_path / "inst.parquet")  # fmt: skip

    predictor = twopass.TwoPass.from_config(yaml_path)
    records = predictor(paths, image_ids=ids)
    assert_same_as_cli(records, read_table(tmp_path / "inst.parquet", "instances")[0])
    one = predictor(paths[3], image_ids=[ids[3]])  # one image in, one record out: the same rows
    assert isinstance(one, twopass.Instances)
    assert_same_rows(one.to_table(), records[3].to_table())


def test_two_pass_arguments_are_a_pipeline_config(config, ckpts, synth_small, images):
    """TwoPass(detectors=..., segmenter=..., fusion=..., tta=...) runs the pipeline config with
    those settings; own_boxes fuses the segmenter's own boxes as the config's does."""
    paths, ids = images[0][:2], images[1][:2]
    tta = {"scales": [64], "flip": True}
    cfg = config(synth_small, ckpts, fusion={"method": "soft-nms"}).to_dict()
    for d in cfg["detectors"]:
        d.update(tta=tta, max_per_image=30, weight=2.0 if d["name"] == "a" else 1.0)
    cfg["segmenter"].update(tta={"scales": [80], "flip": False}, own_boxes={"weight": 0.5, "tta": {"scales": [64]}})
    expected = twopass.TwoPass.from_config(cfg)(paths, image_ids=ids)
    predictor = twopass.TwoPass(detectors=[ckpts["a"], ckpts["b"]], segmenter=ckpts["seg"], fusion={"method": "soft-nms"}, tta=tta,
                                segmenter_tta={"scales": [80]}, own_boxes={"weight": 0.5, "tta": {"scales": [64]}},
                                weights=[2.0, 1.0], detect={"max_per_image": 30})  # fmt: skip
    assert [(m.name, m.weight, len(m.views)) for m in predictor.members] == [("a", 2.0, 2), ("b", 1.0, 2), ("seg", 0.5, 1)]
    got = predictor(paths, image_ids=ids)
    assert sum(len(r) for r in got) > 0 and {s for r in got for s in r.sources} == {"fused:soft-nms"}
    for g, e in zip(got, expected):
        assert_same_rows(g.to_table(), e.to_table())


def test_images_in_memory_are_read_as_files_are(ckpts, synth_small, images, tmp_path):
    """A sideways JPEG with its EXIF orientation tag: the file, the same JPEG opened with PIL
    (tag unapplied), its upright pixels as an RGB array and as OpenCV's BGR array give the same
    rows; the caller's PIL image is left as it was."""
    upright = np.asarray(Image.open(images[0][0]).convert("RGB"))[:, :96]  # 128 x 96: turning it shows
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise; shown turned back
    path = tmp_path / "sideways.jpg"
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    pixels = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert pixels.shape == (128, 96, 3)

    model = twopass.Model.from_run(ckpts["a"])
    from_file = model(path)
    assert from_file.size == (128, 96) and len(from_file) > 0
    assert from_file.boxes[:, 2].max() <= 96 and from_file.boxes[:, 3].max() <= 128
    held = Image.open(path)
    for given, channels in ((held, "rgb"), (pixels, "rgb"), (np.ascontiguousarray(pixels[..., ::-1]), "bgr")):
        assert_same_rows(model(given, channels=channels).to_table(), from_file.to_table())
    assert held.size == (128, 96) and held.getexif()[0x0112] == 6  # (width, height) as stored, the tag kept


def _hand_made() -> tuple[twopass.Instances, np.ndarray, list[np.ndarray]]:
    """A 40 x 60 gray image with three results whose boxes and masks are drawn by hand."""
    image = np.full((40, 60, 3), 100, np.uint8)
    boxes = np.array([[5, 5, 25, 20], [30, 10, 55, 35], [6, 6, 24, 19]], np.float32)
    masks = []
    for x1, y1, x2, y2 in boxes.astype(int):
        m = np.zeros((40, 60), np.uint8)
        m[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2] = 1
        masks.append(m)
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    table = instances_table(detections_table([7] * 3, [1, 2, 2], [0.9, 0.6, 0.2], boxes, "fused:wbf"), rles)
    cats = Categories((1, 2), ("ring", "square"))
    return twopass.Instances(table, cats, image, image_id=7, name="hand"), image, masks


def test_instances_record():
    r, image, masks = _hand_made()
    assert len(r) == 3 and r.size == (40, 60) and r.names == ["ring", "square", "square"]
    assert r.labels.tolist() == [1, 2, 2] and r.boxes[1].tolist() == [30, 10, 55, 35]
    assert np.array_equal(r.masks, np.stack(masks).astype(bool))
    # filters
    assert r.filter(score=0.5).scores.tolist() == pytest.approx([0.9, 0.6])
    assert r.filter(categories="square").names == ["square", "square"]
    assert r.filter(score=0.5, categories=[2]).boxes.tolist() == [[30, 10, 55, 35]]
    assert len(r[r.scores > 0.95]) == 0 and r[r.labels == 1].names == ["ring"] and r[-1].scores.tolist() == pytest.approx([0.2])
    assert np.array_equal(r[1:].masks, np.stack(masks[1:]).astype(bool))
    with pytest.raises(ValueError, match=r"categories: no category named 'circle'; the names are \['ring', 'square'\]"):
        r.filter(categories="circle")
    with pytest.raises(ValueError, match=r"categories: no category id 3; the ids are \[1, 2\]"):
        r.filter(categories=3)
    # COCO results and the project's table: the same rows both ways
    coco = r.to_coco()
    assert coco[1]["bbox"] == [30, 10, 25, 25] and coco[1]["image_id"] == 7 and coco[1]["category_id"] == 2
    assert_same_rows(from_coco_results(coco, "fused:wbf"), r.to_table())


def test_instances_plot_draws_boxes_names_and_masks_over_the_image():
    r, image, masks = _hand_made()
    before = image.copy()
    pic = r.plot()  # as the report's pictures: scores below 0.3 (row 2) hidden
    assert pic.dtype == np.uint8 and pic.shape == (40, 60, 3)
    assert np.array_equal(image, before)  # drawn on a copy
    blend = 0.55 * 100 + 0.45 * np.array(category_color(2), np.float32)
    assert np.abs(pic[25, 40] - blend).max() <= 1  # inside row 1's mask: its category's colour over the image
    assert pic[33, 54].tolist() == list(category_color(2))  # row 1's box outline (right edge)
    assert pic[38, 2].tolist() == [100, 100, 100]  # outside every box
    # row 2's box outline (its bottom-right corner) shows once its score is let through, and only
    # when a box over a better one of another category (row 0) is drawn too
    assert pic[18, 23].tolist() == [100, 100, 100]
    assert r.plot(score=None)[18, 23].tolist() == [100, 100, 100]
    assert r.plot(score=None, one_box_per_object=False)[18, 23].tolist() == list(category_color(2))
    big = r.plot(scale=3, pil=True)
    assert isinstance(big, Image.Image) and big.size == (180, 120)
    assert np.asarray(big)[25 * 3 + 1, 40 * 3 + 1].tolist() == pic[25, 40].tolist()  # the same mask overlay, enlarged


def test_bad_inputs_are_named_before_any_compute(ckpts, tiny_model, tmp_path, config, synth_small):
    model = twopass.Model.from_run(ckpts["a"])
    with pytest.raises(DataError, match="^image: expected a file path, a PIL image or a numpy array, got int$"):
        model(123)
    with pytest.raises(DataError, match=r"^images\[1\]: a numpy image is UInt8\[H, W, 3\] \(RGB\), .* got float64\[4, 4, 3\]$"):
        model([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3))])
    with pytest.raises(DataError, match=f"images\\[0\\]: image file {tmp_path / 'missing.png'} is missing"):
        model([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match=r"^image_ids: 1 ids for 2 images$"):
        model([np.zeros((4, 4, 3), np.uint8)] * 2, image_ids=[1])
    with pytest.raises(DeviceError, match=r"^device cuda:7: "):
        twopass.Model.from_run(ckpts["a"], device="cuda:7")
    with pytest.raises(ValueError, match=r"^tta: field 'scales': .*sizes >= 16 px"):
        twopass.Model.from_run(ckpts["a"], tta={"scales": [8]})
    with pytest.raises(ValueError, match=f"^TwoPass: detector 'seg' {ckpts['seg']}: a segmenter checkpoint, expected a detector$"):
        twopass.TwoPass(detectors={"seg": ckpts["seg"]}, segmenter=ckpts["seg"])
    # a detector of another category list than the segmenter's
    from twopass.detector.api import DETECTOR
    from twopass.detector.checkpoint import save_checkpoint

    cfg = DETECTOR.config(tiny_model("other"))
    other = save_checkpoint(tmp_path / "other", DETECTOR.build(cfg, 1), kind="detector", config=cfg.to_dict(),
                            categories=Categories((1,), ("ring",)), iteration=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"detector 'other' .* against segmenter .*: category list does not match .*has unexpected ids"):
        twopass.TwoPass(detectors=[other], segmenter=ckpts["seg"])
    # a config whose models were never trained, given as a mapping: no run folder to look in
    untrained = config(synth_small, None).to_dict()
    with pytest.raises(PipelineConfigError, match=r"^pipeline config: detector 'a' has no checkpoint; give run_dir="):
        twopass.TwoPass.from_config(untrained)
