"""twopass: two-pass instance segmentation.

The predictor for notebooks and services is here, at the package root:

    import twopass
    predictor = twopass.TwoPass.from_config("runs/demo/pipeline.yaml")  # or twopass.Model.from_run("runs/r18")
    result = predictor("photo.jpg")  # an Instances record: boxes, scores, names, masks, .plot()

The stages are the subpackages (`twopass.pipeline`, `twopass.detector`, `twopass.ensemble`,
`twopass.segmenter`, `twopass.flows`). This file is `pipeline/_root/__init__.py` in the
repository (pyproject.toml maps it: the repository's top-level folders are the stages'). The
predictor is imported on first use, so `import twopass` and the CLI do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TwoPass": "twopass.segmenter.predictor",
    "Model": "twopass.segmenter.predictor",
    "Instances": "twopass.segmenter.predictor",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'twopass' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
