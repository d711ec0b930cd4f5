"""Seeing the alignment: explanation figures, training curves and the web demo.

    from granalign.viz import explain, plot_training_curves
    paths = explain(model, processor, "a red circle left of a blue square", "out/", image="scene.png")
    plot_training_curves(history, "runs/x/training_curves.png")

Figures need the `viz` extra (matplotlib), the demo (`granalign.viz.demo`) the `demo` extra (gradio);
both are imported only when used. `granalign.viz.explain` is the `explain()` function; its module's
other names are imported with `from granalign.viz.explain import compute_explanation`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (cheap: torch and numpy only) so that the function, not the submodule of the same name,
# is the package's `explain` attribute.
from .explain import Explanation, compute_explanation, explain, group_words, infer_grid_shape, load_image

_LAZY = {
    "draw_figures": "figures",
    "save_figures": "figures",
    "plot_training_curves": "curves",
    "training_curves_figure": "curves",
    "build_demo": "demo",
    "launch_demo": "demo",
}

__all__ = [
    "Explanation",
    "build_demo",
    "compute_explanation",
    "draw_figures",
    "explain",
    "group_words",
    "infer_grid_shape",
    "launch_demo",
    "load_image",
    "plot_training_curves",
    "save_figures",
    "training_curves_figure",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'granalign.viz' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
