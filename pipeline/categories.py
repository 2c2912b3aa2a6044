"""The one place where COCO category ids meet contiguous training labels.

Models predict contiguous labels 1..K (0 is background, as in torchvision's detection
models); every file this project writes carries the dataset's COCO `category_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


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
            if "id" not in c or "name" not in c:
                raise ValueError(f"{source}: categories[{i}] needs 'id' and 'name', got {c}")
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
