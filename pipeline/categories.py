"""The one place where COCO category ids meet contiguous training labels.

Models predict contiguous labels 1..K (0 is background, as in torchvision's detection
models); every file this project writes carries the dataset's COCO `category_id`. Other
tools' class indices become those ids through a `CategoryMap`.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml


@dataclass(frozen=True)
class Categories:
    """An ordered list of COCO categories. Label i+1 is `ids[i]`; label 0 is background."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError("categories: ids and names differ in length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"categories: duplicate ids in {list(self.ids)}")
        self._index  # build the lookup eagerly so a bad list fails here

    @classmethod
    def from_coco(cls, cats: Iterable[dict], source: str = "categories") -> "Categories":
        """From a COCO `categories` list, sorted by id so every file gives the same labels."""
        cats = list(cats)
        for i, c in enumerate(cats):
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise ValueError(f"{source}: categories[{i}] needs 'id' and 'name', got {c}")
            if _integer(c["id"]) is None:
                raise ValueError(f"{source}: categories[{i}] ({c['name']!r}): id {c['id']!r} is not an integer")
        cats = sorted(cats, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    def to_coco(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    @property
    def _index(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.ids)}

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (models have K + 1 outputs with background)."""
        return len(self.ids)

    def name(self, category_id: int) -> str:
        return self.names[self.to_labels([category_id])[0] - 1]

    def to_labels(self, category_ids: Sequence[int] | np.ndarray, source: str = "") -> np.ndarray:
        """COCO ids -> contiguous labels 1..K (int64). Unknown ids raise, naming them."""
        index = self._index
        ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        unknown = sorted({int(c) for c in ids if int(c) not in index})
        if unknown:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}unknown category_id {unknown}; known ids are {list(self.ids)}")
        return np.fromiter((index[int(c)] for c in ids), dtype=np.int64, count=ids.size)

    def to_category_ids(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Contiguous labels 1..K -> COCO ids (int32)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 1 or labels.max() > len(self.ids)):
            raise ValueError(f"labels must lie in 1..{len(self.ids)}, got {labels.min()}..{labels.max()}")
        return np.asarray(self.ids, dtype=np.int32)[labels - 1]

    def check_same(self, other: "Categories", what: str) -> None:
        """Raise if `other` (the list found in `what`) is not this expected list, saying what differs."""
        if self == other:
            return
        mine, theirs = dict(zip(self.ids, self.names)), dict(zip(other.ids, other.names))
        parts = []
        if missing := sorted(set(mine) - set(theirs)):
            parts.append(f"lacks ids {missing}")
        if extra := sorted(set(theirs) - set(mine)):
            parts.append(f"has unexpected ids {extra}")
        if renamed := [f"{i}: {mine[i]!r} vs {theirs[i]!r}" for i in mine if i in theirs and mine[i] != theirs[i]]:
            parts.append("renamed " + ", ".join(renamed))
        raise ValueError(f"{what}: category list does not match the expected one ({'; '.join(parts)})")


@dataclass(frozen=True)
class CategoryMap:
    """Another tool's class indices -> this dataset's COCO category ids (`--category-map FILE`).

    Detectors such as Ultralytics, Detectron2 and MMDetection can write class indices in the
    `category_id` of their COCO results JSON; the map turns them into the dataset's ids.
    """

    ids: dict[int, int]
    source: str

    @classmethod
    def load(cls, path: str | Path, categories: Categories | None = None) -> "CategoryMap":
        """Read a JSON or YAML mapping {class index: category id or category name}. Names, and
        ids when `categories` is given, are checked against the dataset's categories."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        is_json = path.suffix.lower() == ".json"
        try:
            # a key given twice is refused: the last value would win silently
            text = path.read_text()
            data = json.loads(text, object_pairs_hook=_unique_pairs) if is_json else yaml.load(text, _UniqueKeyLoader)
        except _DuplicateKey as e:
            raise ValueError(f"{path}: key {e.key!r} appears twice{e.where}; give each class index once") from None
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            # one line: YAML's messages span several
            raise ValueError(f"{path}: not valid {'JSON' if is_json else 'YAML'} ({' '.join(str(e).split())})") from None
        return cls.from_mapping(data, str(path), categories)

    @classmethod
    def from_mapping(cls, data: Any, source: str, categories: Categories | None = None) -> "CategoryMap":
        """`load` on parsed data; `source` names it in messages."""
        if not isinstance(data, dict) or not data:
            got = "an empty mapping" if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source}: a category map holds a mapping {{class index: category id or name}}, got {got}")
        ids: dict[int, int] = {}
        for key, value in data.items():
            # JSON keys are always strings, YAML keys may be ints; neither bools nor negatives pass
            if not str(key).strip().isdecimal():
                raise ValueError(f"{source}: key {key!r} is not a class index (0, 1, ...); category names go on the right")
            index, where = int(key), f"{source}: class index {key}"
            if index in ids:
                raise ValueError(f"{source}: class index {index} appears twice")
            if isinstance(value, str):
                if categories is None:
                    raise ValueError(f"{where}: {value!r} is a category name, and names need the dataset's category list "
                                     "(twopass fuse: --images with COCO annotations)")
                if categories.names.count(value) != 1:
                    raise ValueError(f"{where}: {'no' if value not in categories.names else 'more than one'} category named "
                                     f"{value!r}; known names are {list(categories.names)}")
                value = categories.ids[categories.names.index(value)]
            elif _index(value) is None:
                raise ValueError(f"{where}: {value!r} is neither a category id nor a category name")
            elif categories is not None and value not in categories.ids:
                raise ValueError(f"{where}: {value} is not a category id of the dataset; known ids are {list(categories.ids)}")
            ids[index] = value
        return cls(ids, source)

    def _keys_text(self) -> str:
        keys = sorted(self.ids)
        return f"{keys[0]}..{keys[-1]}" if keys == list(range(keys[0], keys[-1] + 1)) else str(keys)

    def apply(self, values: Sequence[Any], what: str, image_ids: Sequence[Any]) -> list[int]:
        """The category ids of the class indices `values` (the `category_id`s of the results
        file `what`, one per entry). The first value with no entry raises, naming entry and image."""
        bad = [i for i, v in enumerate(values) if _index(v) not in self.ids]
        if bad:
            i = bad[0]
            raise ValueError(f"{what}: entry {i} (image_id {image_ids[i]}): category_id {values[i]!r} is not in --category-map "
                             f"{self.source} (keys {self._keys_text()}); {len(bad)} such entries")
        return [self.ids[v] for v in values]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, where: str = ""):
        super().__init__(key)
        self.key, self.where = key, where


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a dict, refusing a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<` merges first, as the base class does
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:  # equal keys (0 and 0x0 too) would collapse into one entry
                    raise _DuplicateKey(key, f" (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:
                pass  # an unhashable key: the base class names it
        return super().construct_mapping(node, deep)


def _integer(value: Any) -> int | None:
    """`value` as an int when it is one (or its text: "3"), else None; not a bool or a fraction."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):  # numpy's too
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        return int(value)
    return None


def _index(value: Any) -> int | None:
    """`value` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
