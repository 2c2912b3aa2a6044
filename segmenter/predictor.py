"""The predictor for notebooks and services: images in (files, PIL images, numpy arrays), one
`Instances` record per image out, with boxes, scores, categories, masks and a picture.

    import twopass
    predictor = twopass.TwoPass.from_config("runs/demo/pipeline.yaml")   # or TwoPass(detectors=[...], segmenter=...)
    result = predictor("photo.jpg")                                        # a path, PIL image, array, or a list of them
    result.filter(score=0.3).plot(pil=True)

It calls the stages' front doors in process, exactly as `twopass detect`, `twopass fuse` and
`twopass segment` do (`detector.api.detect_images`, `ensemble.api.fuse_files`,
`segmenter.api.segment_images`, the settings of `pipeline.settings`): the images of one call
are one image set, held in memory, read through the same conversion as image files
(`pipeline.coco.image_to_tensor`: RGB, upright by EXIF orientation). It lives in `segmenter/`
because pass two is the top of the model stack: it imports the detectors and the fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from twopass.detector.api import LoadedModel, ModelKind, detect_images, load_for_inference, views_of
from twopass.detector.checkpoint import read_meta, resolve
from twopass.detector.infer import View
from twopass.detector.stage import resolve_model
from twopass.ensemble.api import fuse_files
from twopass.pipeline.categories import Categories
from twopass.pipeline.coco import DataError, ImageSet, image_to_tensor, load_image
from twopass.pipeline.config import (
    EvaluationConfig,
    OwnBoxesSpec,
    PipelineConfig,
    PipelineConfigError,
    TTAConfig,
    load_pipeline_config,
    pipeline_config_from_dict,
    validate_mapping,
)
from twopass.pipeline.devices import check_device
from twopass.pipeline.settings import DISPLAY_SCORE_THRESH, DetectSettings, FuseSettings, SegmentSettings
from twopass.pipeline.tables import boxes_of, images_table, rles_of, to_coco_results
from twopass.pipeline.visualize import draw_instances, keep_one_box_per_object

from .api import SEGMENTER, kind_of, segment_images

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray
Channels = Literal["rgb", "bgr"]

# What `Instances.plot` hides by default: what the report's pictures hide (pipeline.config).
PLOT_SCORE = DISPLAY_SCORE_THRESH
PLOT_TOP = EvaluationConfig.model_fields["overlay_top"].default


# --------------------------------------------------------------------------- images in


class HeldImages(ImageSet):
    """Images held in memory, known by id, read by the stages as an `ImageSet` of files is:
    each UInt8Tensor[3, H, W] RGB, upright. `names`: what each image was given as."""

    def __init__(self, pixels: Sequence[torch.Tensor], ids: Sequence[int], names: Sequence[str]):
        table = images_table(ids, names, [int(p.shape[1]) for p in pixels], [int(p.shape[2]) for p in pixels])
        super().__init__(table, Path("."), source="images given to the predictor")
        self._pixels = {int(i): p for i, p in zip(ids, pixels)}

    def read(self, image_id: int) -> torch.Tensor:
        self.size(image_id)  # an unknown id is named, as for files
        return self._pixels[int(image_id)]

    def path(self, image_id: int) -> Path:
        raise DataError(f"{self.source}: image_id {image_id} is held in memory; it has no file")


def to_pixels(image: ImageInput, where: str, channels: Channels = "rgb") -> tuple[torch.Tensor, str]:
    """(UInt8Tensor[3, H, W] RGB upright, a name) of one input image: a file path, a PIL image,
    or a numpy array (UInt8[H, W, 3] in `channels` order, [H, W, 4] with alpha, [H, W] gray;
    16-bit and float gray as image files of those modes). Everything goes through
    `image_to_tensor`, as image files do. Errors name `where`."""
    if isinstance(image, (str, Path)):
        return load_image(Path(image), where), str(image)
    if isinstance(image, Image.Image):
        return _checked(image_to_tensor(image), where), str(getattr(image, "filename", "") or where)
    if isinstance(image, np.ndarray):
        a = image
        colour = a.ndim == 3 and a.shape[2] in (3, 4) and a.dtype == np.uint8
        gray = a.ndim == 2 and a.dtype in (np.uint8, np.uint16, np.int32, np.float32)
        if not (colour or gray):
            raise DataError(f"{where}: a numpy image is UInt8[H, W, 3] ({channels.upper()}), UInt8[H, W, 4] or a gray [H, W] "
                            f"array, got {a.dtype}{list(a.shape)}")  # fmt: skip
        if colour and channels == "bgr":  # OpenCV's order (cv2.imread)
            a = np.concatenate([a[..., 2::-1], a[..., 3:]], axis=2)
        return _checked(image_to_tensor(Image.fromarray(np.ascontiguousarray(a))), where), where
    raise DataError(f"{where}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")


def _checked(pixels: torch.Tensor, where: str) -> torch.Tensor:
    if min(pixels.shape[1:]) == 0:
        raise DataError(f"{where}: image has no pixels ({pixels.shape[1]}x{pixels.shape[2]})")
    return pixels


def hold_images(images: ImageInput | Sequence[ImageInput], image_ids: Sequence[int] | None = None,
                channels: Channels = "rgb") -> tuple[HeldImages, bool]:  # fmt: skip
    """(the images of one call as an image set, whether one image was given rather than a list).
    Ids: `image_ids`, else 1..N in the order given. Every image is read before any compute."""
    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels {channels!r}: expected 'rgb' or 'bgr'")
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if not items:
        raise ValueError("images: an empty list; give at least one image")
    ids = list(range(1, len(items) + 1)) if image_ids is None else [int(i) for i in image_ids]
    if len(ids) != len(items):
        raise ValueError(f"image_ids: {len(ids)} ids for {len(items)} images")
    if len(set(ids)) != len(ids):
        raise ValueError(f"image_ids: ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:5]})")
    read = [to_pixels(im, "image" if single else f"images[{k}]", channels) for k, im in enumerate(items)]
    return HeldImages([p for p, _ in read], ids, [n for _, n in read]), single


# --------------------------------------------------------------------------- results out


class Instances:
    """The results of one image: rows of the project's detections or instances table.

    boxes: Float32[N, 4] XYXY in pixels of the original (upright) image; scores: Float32[N];
    labels: Int32[N], the dataset's COCO category ids; names: their category names; masks:
    Bool[N, H, W] decoded on demand from the COCO RLEs (`rles`), None without masks.
    """

    def __init__(self, table: pa.Table, categories: Categories, image: np.ndarray | None = None, image_id: int = 1,
                 name: str = ""):  # fmt: skip
        """`table`: the image's rows (every image_id `image_id`); `image`: UInt8[H, W, 3] RGB, for `plot`."""
        self.table = table
        self.categories = categories
        self.image = image
        self.image_id = int(image_id)
        self.name = name

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        what = "instances" if self.has_masks else "detections"
        return f"Instances({len(self)} {what}, image_id {self.image_id}, {self.name or 'image'})"

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> "Instances":
        """Rows by index, slice, index array or boolean mask (e.g. `r[r.scores > 0.5]`)."""
        n = len(self)
        if isinstance(key, (int, np.integer)):
            if not -n <= key < n:
                raise IndexError(f"row {key} of {n}")
            rows = np.array([key % n])
        elif isinstance(key, slice):
            rows = np.arange(n)[key]
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                if rows.shape != (n,):
                    raise IndexError(f"a boolean mask of {rows.shape[0] if rows.ndim else 0} for {n} rows")
                rows = np.flatnonzero(rows)
        return self._take(rows.astype(np.int64))

    def _take(self, rows: np.ndarray) -> "Instances":
        return Instances(self.table.take(pa.array(rows, pa.int64())), self.categories, self.image, self.image_id, self.name)

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) of the image, when it is held."""
        return None if self.image is None else (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def boxes(self) -> np.ndarray:
        return boxes_of(self.table)

    @property
    def scores(self) -> np.ndarray:
        return self.table.column("score").to_numpy().astype(np.float32, copy=False)

    @property
    def labels(self) -> np.ndarray:
        return self.table.column("category_id").to_numpy().astype(np.int32, copy=False)

    @property
    def names(self) -> list[str]:
        return [self.categories.name(int(c)) for c in self.labels]

    @property
    def sources(self) -> list[str]:
        """The model and view (`r18@128+flip`) or fusion (`fused:wbf`) each row comes from."""
        return self.table.column("source").to_pylist()

    @property
    def has_masks(self) -> bool:
        return "mask_counts" in self.table.column_names

    @property
    def rles(self) -> list[dict] | None:
        """COCO compressed RLEs of the whole image, one a row (pycocotools' dicts), or None."""
        return rles_of(self.table) if self.has_masks else None

    @cached_property
    def masks(self) -> np.ndarray | None:
        """Bool[N, H, W], decoded from the RLEs on first use; None without masks."""
        if not self.has_masks:
            return None
        from pycocotools import mask as mask_utils

        if not len(self):
            return np.zeros((0, *(self.size or (0, 0))), dtype=bool)
        return np.moveaxis(mask_utils.decode(self.rles), -1, 0).astype(bool)  # pycocotools gives [H, W, N]

    def filter(self, score: float | None = None, categories: int | str | Iterable[int | str] | None = None) -> "Instances":
        """The rows scoring at least `score` and of `categories` (COCO ids or names)."""
        keep = np.ones(len(self), dtype=bool)
        if score is not None:
            keep &= self.scores >= float(score)
        if categories is not None:
            wanted = [categories] if isinstance(categories, (int, str, np.integer)) else list(categories)
            by_name = dict(zip(self.categories.names, self.categories.ids))
            ids = set()
            for c in wanted:
                if isinstance(c, str):
                    if c not in by_name:
                        raise ValueError(f"categories: no category named {c!r}; the names are {list(self.categories.names)}")
                    ids.add(by_name[c])
                elif int(c) in self.categories.ids:
                    ids.add(int(c))
                else:
                    raise ValueError(f"categories: no category id {c}; the ids are {list(self.categories.ids)}")
            keep &= np.isin(self.labels, sorted(ids))
        return self[keep]

    def to_table(self) -> pa.Table:
        """The rows as the project's detections or instances table (`pipeline.tables`), as
        `twopass detect` / `segment` write them."""
        return self.table

    def to_coco(self) -> list[dict]:
        """The rows as COCO results: image_id, category_id, bbox (XYWH), score, segmentation (RLE)."""
        return to_coco_results(self.table)

    def plot(self, score: float | None = PLOT_SCORE, top: int | None = PLOT_TOP, one_box_per_object: bool = True,
             masks: bool = True, scale: int = 1, pil: bool = False) -> np.ndarray | Image.Image:  # fmt: skip
        """The image with boxes, category names, scores and mask overlays, one colour per
        category, as the report's pictures draw them (`pipeline.visualize`): rows scoring below
        `score` hidden, the `top` best kept, a box overlapping a better one of another category
        hidden (`one_box_per_object`). `scale`: enlarged by an integer factor (labels stay
        readable on small images). Returns UInt8[H * scale, W * scale, 3] RGB, or a PIL image."""
        if self.image is None:
            raise ValueError("plot: this record holds no image")
        shown = self if score is None else self.filter(score=score)
        if top is not None and len(shown) > top:
            shown = shown._take(np.sort(np.argsort(-shown.scores, kind="stable")[:top]))
        if one_box_per_object and len(shown) > 1:
            shown = shown[keep_one_box_per_object(shown.boxes, shown.labels, shown.scores)]
        picture = draw_instances(self.image, shown.boxes, shown.labels.tolist(), self.categories, shown.scores.tolist(),
                                 list(shown.masks) if masks and shown.has_masks else None, scale=max(1, int(scale)))  # fmt: skip
        return picture if pil else np.asarray(picture)


def split(table: pa.Table, images: HeldImages, categories: Categories) -> list[Instances]:
    """One `Instances` a image of `images`, in their order: the table's rows of that image, in
    the table's order."""
    ids = table.column("image_id").to_numpy()
    out = []
    for image_id, name in zip(images.image_ids, images.table.column("file_name").to_pylist()):
        rows = pa.array(np.flatnonzero(ids == image_id), pa.int64())
        pixels = images.read(image_id).permute(1, 2, 0).numpy()
        out.append(Instances(table.take(rows), categories, pixels, image_id, name))
    return out


# --------------------------------------------------------------------------- the predictors


def _record(cls: type, value: Any, what: str) -> Any:
    """A settings record from itself, a mapping or None (the defaults); errors name `what`."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return validate_mapping(cls, dict(value), what, ValueError, "setting")
    raise ValueError(f"{what}: expected a {cls.__name__} or a mapping, got {type(value).__name__}")


def _device(device: str) -> str:
    check_device(device, "device")
    return device


@dataclass
class Member:
    """One model of pass one: its checkpoint loaded, its views and settings, its fusion weight."""

    kind: ModelKind
    name: str
    loaded: LoadedModel
    views: list[View]
    settings: DetectSettings
    weight: float = 1.0


def _load(kind: ModelKind | None, run: str | Path, device: str, fast: bool, what: str) -> LoadedModel:
    """A run folder or checkpoint loaded as `kind` (None: the checkpoint's own kind)."""
    meta = read_meta(run)  # a missing or malformed checkpoint is named before any weights are read
    kind = kind or kind_of(meta.kind)
    if meta.kind != kind.name:
        raise ValueError(f"{what} {run}: a {meta.kind} checkpoint, expected a {kind.name}")
    return load_for_inference(kind, run, device, fast)


def _detect(member: Member, images: HeldImages, device: str) -> pa.Table:
    table, _ = detect_images(member.loaded, images, member.views, member.settings, name=member.name, device=device,
                             with_masks=member.kind.name == SEGMENTER.name)  # fmt: skip
    return table


class Model:
    """One trained detector, or a segmenter run end to end (its own boxes and masks), as
    `twopass detect` (`--with-masks` for a segmenter) runs it.

        model = twopass.Model.from_run("runs/r18_lsd", tta={"scales": [128, 160], "flip": True})
        result = model("photo.jpg")  # or a PIL image, a numpy array, or a list of them
    """

    def __init__(self, run: str | Path, *, tta: TTAConfig | Mapping | None = None, settings: DetectSettings | Mapping | None = None,
                 name: str | None = None, device: str = "cpu", fast: bool = True):  # fmt: skip
        """`run`: a run folder (its last checkpoint) or a checkpoint; `tta`: {scales, flip}
        (default: the model's test size, no flip); `settings`: `DetectSettings` (score_thresh,
        max_per_image, batch, precision; default: `twopass detect`'s); `name`: the `source`
        of its rows (default: the model config's name); `fast`: BatchNorm folded (as the CLI)."""
        self.device = _device(device)
        tta = _record(TTAConfig, tta, "tta")
        settings = _record(DetectSettings, settings, "settings")
        loaded = _load(None, run, self.device, fast, "run")
        self.member = Member(kind_of(loaded.meta.kind), name or loaded.name, loaded,
                             views_of(loaded.meta.path, tta.scales, tta.flip), settings)  # fmt: skip

    @classmethod
    def from_run(cls, run: str | Path, **kwargs: Any) -> "Model":
        """The model of a run folder or checkpoint; `kwargs` as the constructor's."""
        return cls(run, **kwargs)

    @property
    def kind(self) -> str:
        """"detector" or "segmenter"."""
        return self.member.kind.name

    @property
    def categories(self) -> Categories:
        return self.member.loaded.meta.categories

    def __repr__(self) -> str:
        views = ", ".join(v.source(self.member.name) for v in self.member.views)
        return f"Model({self.kind} {self.member.loaded.meta.path}, views {views}, device {self.device})"

    def __call__(self, images: ImageInput | Sequence[ImageInput], *, image_ids: Sequence[int] | None = None,
                 channels: Channels = "rgb") -> Instances | list[Instances]:  # fmt: skip
        """One `Instances` for one image, a list for a list. `image_ids`: the ids the rows
        carry (default 1..N in order); `channels`: of numpy arrays, "bgr" for OpenCV's."""
        held, single = hold_images(images, image_ids, channels)
        results = split(_detect(self.member, held, self.device), held, self.categories)
        return results[0] if single else results


class TwoPass:
    """The two-pass pipeline on images: every model of pass one (with its views), the fusion of
    their boxes, the segmenter's masks on the fused boxes, as `twopass detect`, `fuse` and
    `segment` (and the flows, shard by shard) compute them for a pipeline config.

        predictor = twopass.TwoPass.from_config("runs/demo/pipeline.yaml")
        predictor = twopass.TwoPass(detectors=["runs/a", "runs/b"], segmenter="runs/seg",
                                    fusion={"method": "wbf"}, tta={"scales": [128, 160], "flip": True})
    """

    def __init__(
        self,
        detectors: Sequence[str | Path] | Mapping[str, str | Path],
        segmenter: str | Path,
        *,
        fusion: FuseSettings | Mapping | None = None,
        tta: TTAConfig | Mapping | None = None,
        segmenter_tta: TTAConfig | Mapping | None = None,
        weights: Sequence[float] | None = None,
        own_boxes: bool | OwnBoxesSpec | Mapping = False,
        detect: DetectSettings | Mapping | None = None,
        segment: SegmentSettings | Mapping | None = None,
        device: str = "cpu",
        fast: bool = True,
    ):
        """The pipeline config these name, run as `from_config` runs one. `detectors`: run
        folders or checkpoints (named by their model config's name), or {name: run};
        `segmenter`: the segmenter's; `fusion`: `FuseSettings` (default: `twopass fuse`'s);
        `tta`: {scales, flip} of every detector (default: its test size); `segmenter_tta`: of
        pass two; `weights`: one fusion weight a detector; `own_boxes`: the segmenter's own
        boxes fused too (True, or {weight, tta}); `detect`: `DetectSettings` of every detector;
        `segment`: `SegmentSettings` of pass two (its precision also that of its own boxes)."""
        _device(device)
        runs = {str(k): v for k, v in detectors.items()} if isinstance(detectors, Mapping) else {}
        if not isinstance(detectors, Mapping):
            for k, run in enumerate(detectors):
                name = str(read_meta(run).config.get("name") or f"detector{k}")
                if name in runs:
                    raise ValueError(f"detectors[{k}] {run}: its model is named {name!r}, as another detector's; "
                                     "give the detectors as {name: run}")  # fmt: skip
                runs[name] = run
        if not runs:
            raise ValueError("detectors: give at least one detector run")
        if weights is not None and len(weights) != len(runs):
            raise ValueError(f"weights: {len(weights)} weights for {len(runs)} detectors")
        settings = _record(DetectSettings, detect, "detect").model_dump()
        tta = _record(TTAConfig, tta, "tta").model_dump()
        specs = []
        for k, (name, run) in enumerate(runs.items()):
            meta = read_meta(run)
            specs.append({"name": name, "model": meta.config, "checkpoint": str(run), "tta": tta, **settings,
                          "weight": 1.0 if weights is None else float(weights[k])})  # fmt: skip
        seg_meta = read_meta(segmenter)
        seg_name = str(seg_meta.config.get("name") or "segmenter")
        own = None
        if own_boxes is not False and own_boxes is not None:
            own = _record(OwnBoxesSpec, None if own_boxes is True else own_boxes, "own_boxes").model_dump()
        config = {
            "data": {"images": "."},  # not read: the images come with each call
            "detectors": specs,
            "fusion": _record(FuseSettings, fusion, "fusion").model_dump(),
            "segmenter": {"name": seg_name if seg_name not in runs else "segmenter", "model": seg_meta.config,
                          "checkpoint": str(segmenter), "tta": _record(TTAConfig, segmenter_tta, "segmenter_tta").model_dump(),
                          "own_boxes": own, **_record(SegmentSettings, segment, "segment").model_dump()},
            "device": device,
        }  # fmt: skip
        self._open(pipeline_config_from_dict(config, "TwoPass"), "TwoPass", None, device, fast)

    @classmethod
    def from_config(cls, config: str | Path | PipelineConfig | Mapping, *, run_dir: str | Path | None = None,
                    device: str | None = None, fast: bool = True) -> "TwoPass":  # fmt: skip
        """The predictor of a pipeline config (a YAML file, a mapping or a `PipelineConfig`):
        its models of pass one (the segmenter's own boxes too, with `own_boxes`), fusion,
        segmenter and every setting of theirs. Its `data` section is not read, except to find
        the models that `twopass flow train` trained: a model without a `checkpoint` is taken
        from `run_dir` (default: the config file's folder, as RUN/pipeline.yaml sits in its run
        folder). `device`: default the config's."""
        if isinstance(config, (str, Path)):
            source = str(config)
            cfg = load_pipeline_config(config)
            run_dir = Path(config).resolve().parent if run_dir is None else run_dir
        else:
            source = "pipeline config"
            cfg = pipeline_config_from_dict(dict(config) if isinstance(config, Mapping) else config)
        predictor = cls.__new__(cls)
        predictor._open(cfg, source, run_dir, cfg.device if device is None else device, fast)
        return predictor

    def _open(self, cfg: PipelineConfig, source: str, run_dir: str | Path | None, device: str, fast: bool) -> None:
        """Load every model of `cfg` (`source` names it in errors) on `device`."""
        device = _device(device)

        def checkpoint(kind: ModelKind, spec) -> Path:
            if spec.checkpoint is not None:
                return resolve(spec.checkpoint)
            if run_dir is None:
                raise PipelineConfigError(f"{source}: {kind.name} {spec.name!r} has no checkpoint; give run_dir= (the run "
                                          "folder `twopass flow train` trained it in) or set its checkpoint")  # fmt: skip
            # trained under the config's device: its content key names that device, not the predictor's
            return resolve_model(run_dir, kind, spec, cfg.data, cfg.device)

        members = []
        for kind_name, spec in cfg.pass_one():
            kind = kind_of(kind_name)
            loaded = _load(kind, checkpoint(kind, spec), device, fast, f"{source}: {kind.name} {spec.name!r}")
            members.append(Member(kind, spec.name, loaded, views_of(loaded.meta.path, spec.tta.scales, spec.tta.flip), spec, spec.weight))
        s = cfg.segmenter
        seg = _load(SEGMENTER, checkpoint(SEGMENTER, s), device, fast, f"{source}: segmenter {s.name!r}")
        # every model must speak the segmenter's category list: checked before any image is read
        for m in members:
            m.loaded.meta.categories.check_same(seg.meta.categories,
                                                f"{m.kind.name} {m.name!r} ({m.loaded.meta.path}) against segmenter {seg.meta.path}")  # fmt: skip
        self.members = members
        self.segmenter, self.segmenter_name = seg, s.name
        self.segmenter_views = views_of(seg.meta.path, s.tta.scales, s.tta.flip)
        self.fusion: FuseSettings = cfg.fusion
        self.segment_settings: SegmentSettings = s
        self.device = device

    @property
    def categories(self) -> Categories:
        return self.segmenter.meta.categories

    def __repr__(self) -> str:
        members = ", ".join(f"{m.name} ({len(m.views)} views)" for m in self.members)
        return f"TwoPass({members}; fusion {self.fusion.method}; segmenter {self.segmenter_name}; device {self.device})"

    def _detections(self, images: HeldImages) -> dict[str, pa.Table]:
        """Pass one: {model name: its detections on `images`, every view}."""
        return {m.name: _detect(m, images, self.device) for m in self.members}

    def _fused(self, images: HeldImages, detections: Mapping[str, pa.Table]) -> pa.Table:
        """The fused boxes of pass one's tables, as the flows' fuse stage makes them."""
        table, _ = fuse_files(list(detections.values()), self.fusion, weights=[m.weight for m in self.members],
                              image_sizes=images.sizes(), source=f"fused:{self.fusion.method}", categories=self.categories)  # fmt: skip
        return table

    def __call__(self, images: ImageInput | Sequence[ImageInput], *, image_ids: Sequence[int] | None = None,
                 channels: Channels = "rgb") -> Instances | list[Instances]:  # fmt: skip
        """One `Instances` (boxes, scores, categories and masks) for one image, a list for a
        list. `image_ids`: the ids the rows carry (default 1..N in order); `channels`: of numpy
        arrays, "bgr" for OpenCV's."""
        held, single = hold_images(images, image_ids, channels)
        fused = self._fused(held, self._detections(held))
        instances, _, _ = segment_images(self.segmenter, held, fused, self.segmenter_views, self.segment_settings,
                                         name=self.segmenter_name, device=self.device)  # fmt: skip
        results = split(instances, held, self.categories)
        return results[0] if single else results

