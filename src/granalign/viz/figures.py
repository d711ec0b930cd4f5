"""Matplotlib figures of an `Explanation` (see `explain.explain()` to compute, draw and save them).

Every figure is a `matplotlib.figure.Figure` drawn on the non-interactive Agg canvas (no pyplot, no
global state), with titles, colour bars and the caption's words as labels. Values over the visual units
are drawn the same way for every input type: a heat map over the token grid, coloured boxes on the picture
(region features with boxes), or bars per region (region features without boxes).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .explain import Explanation

__all__ = [
    "FIGURE_NAMES",
    "draw_figures",
    "figure_kept_patches",
    "figure_levels",
    "figure_regions",
    "figure_titles",
    "figure_word_keep",
    "figure_word_maps",
    "save_figures",
]

FIGURE_NAMES = ("kept_patches", "word_maps", "regions", "word_keep", "levels")
PANEL_INCHES = 2.6
DPI = 110
MAX_REGION_PANELS = 12
_HEAT = "magma"
_BEST = "#00e5ff"


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _short(word: str, limit: int = 16) -> str:
    return word if len(word) <= limit else word[: limit - 1] + "…"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _panel_grid(figure: Figure, count: int, max_cols: int = 4) -> list[Axes]:
    cols = max(1, min(max_cols, count))
    rows = -(-count // cols)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_axis_off()
    return list(axes[:count])


def _small_multiples(
    count: int, title: str, with_bars: bool, max_cols: int = 4
) -> tuple[Figure, list[Axes], Axes]:
    """A figure of `count` panels plus a colour-bar axes, laid out in inches (no constrained layout:
    with dozens of panels it dominates the drawing time). Bar panels get room for their tick labels."""
    cols = max(1, min(max_cols, count))
    rows = -(-count // cols)
    lines = title.count("\n") + 1
    panel, left, bottom = PANEL_INCHES, (0.65 if with_bars else 0.1), (0.5 if with_bars else 0.1)
    gap_w, gap_h = (0.75, 0.8) if with_bars else (0.15, 0.4)
    top = 0.4 + 0.2 * lines
    width = left + cols * panel + (cols - 1) * gap_w + 0.2 + 0.15 + 0.9
    height = top + rows * panel + (rows - 1) * gap_h + bottom
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = []
    for index in range(count):
        row, col = divmod(index, cols)
        x0 = left + col * (panel + gap_w)
        y0 = height - top - (row + 1) * panel - row * gap_h
        axes.append(figure.add_axes((x0 / width, y0 / height, panel / width, panel / height)))
    grid_height = rows * panel + (rows - 1) * gap_h
    bar_height = min(grid_height, 4.0)
    bar_x = left + cols * panel + (cols - 1) * gap_w + 0.2
    bar_y = height - top - (grid_height + bar_height) / 2
    colour_axes = figure.add_axes((bar_x / width, bar_y / height, 0.15 / width, bar_height / height))
    figure.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return figure, axes, colour_axes


def _canvas(explanation: Explanation) -> tuple[np.ndarray | None, float, float]:
    """The picture to draw on and its width/height in its own pixel units."""
    layout = explanation.layout
    if layout.image is not None:
        return layout.image, float(layout.image.shape[1]), float(layout.image.shape[0])
    if layout.kind == "boxes":  # no picture: a blank canvas spanning the boxes
        return None, float(max(layout.boxes[:, 2].max(), 1.0)), float(max(layout.boxes[:, 3].max(), 1.0))
    return None, 1.0, 1.0


def draw_units(
    ax: Axes,
    explanation: Explanation,
    values: np.ndarray,
    norm: Normalize,
    label: str,
    mark_best: bool = False,
) -> ScalarMappable:
    """Draw `[N]` values over the visual units on `ax`; returns the mappable for a colour bar."""
    layout, cmap = explanation.layout, matplotlib.colormaps[_HEAT]
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    best = int(np.argmax(values))
    if layout.kind == "regions":
        bars = ax.bar(
            np.arange(len(values)), values, color=cmap(norm(values)), edgecolor="black", linewidth=0.4
        )
        if mark_best:
            bars[best].set_edgecolor(_BEST)
            bars[best].set_linewidth(2.5)
        ax.set_xlabel("input region")
        ax.set_ylabel(label)
        ax.set_xticks(np.arange(len(values)))
        pad = 0.08 * (norm.vmax - norm.vmin)
        ax.set_ylim(min(norm.vmin, 0.0) - pad, max(norm.vmax, 0.0) + pad)
        ax.tick_params(axis="x", labelsize=7, labelrotation=90 if len(values) > 12 else 0)
        return mappable
    picture, width, height = _canvas(explanation)
    extent = (0.0, width, height, 0.0)
    if picture is not None:
        ax.imshow(picture, extent=extent)
    else:
        ax.imshow(np.full((2, 2, 3), 0.92), extent=extent)
    if layout.kind == "grid":
        rows, cols = layout.grid_shape
        ax.imshow(
            values.reshape(rows, cols),
            cmap=cmap,
            norm=norm,
            alpha=0.5,
            extent=extent,
            interpolation="nearest",
        )
        if mark_best:
            cell_w, cell_h = width / cols, height / rows
            corner = ((best % cols) * cell_w, (best // cols) * cell_h)
            ax.add_patch(Rectangle(corner, cell_w, cell_h, fill=False, edgecolor=_BEST, linewidth=2))
    else:  # boxes
        for index in np.argsort(values):  # strongest drawn last, on top
            x0, y0, x1, y1 = layout.boxes[index]
            colour = cmap(norm(values[index]))
            ax.add_patch(
                Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, facecolor=(*colour[:3], 0.35), edgecolor=colour, linewidth=1.5
                )
            )
            ax.text(x0 + 1, y0 + 1, str(index), color="white", fontsize=7, va="top",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})  # fmt: skip
        if mark_best:
            x0, y0, x1, y1 = layout.boxes[best]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=_BEST, linewidth=2.5))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()  # also skips tick layout, the slow part of many-panel figures
    return mappable


def _kept_view(explanation: Explanation) -> np.ndarray:
    """The picture with each grid cell's brightness scaled by its keep weight (dropped patches go dark)."""
    picture = explanation.layout.image.astype(np.float32)
    rows, cols = explanation.layout.grid_shape
    height, width = picture.shape[:2]
    row_of = np.minimum(np.arange(height) * rows // height, rows - 1)
    col_of = np.minimum(np.arange(width) * cols // width, cols - 1)
    keep = explanation.keep.reshape(rows, cols)[row_of][:, col_of]
    return (picture * keep[..., None]).round().astype(np.uint8)


def figure_kept_patches(explanation: Explanation) -> Figure:
    """The picture and the significance adapter's keep weight of each patch/region (A_V)."""
    layout, keep = explanation.layout, explanation.keep
    panels = 1 + (layout.image is not None) + (layout.image is not None and layout.kind == "grid")
    figure = _new_figure(PANEL_INCHES * max(panels, 1.6) + 0.9, PANEL_INCHES + 0.9)
    axes = _panel_grid(figure, panels)
    if layout.image is not None:
        axes[0].imshow(layout.image)
        axes[0].set_title("model input" if layout.kind == "grid" else "input", fontsize=9, y=1.0)
        axes[0].set_axis_off()
    if panels == 3:
        axes[1].imshow(_kept_view(explanation))
        axes[1].set_title("input × keep weight", fontsize=9, y=1.0)
        axes[1].set_axis_off()
    mappable = draw_units(axes[-1], explanation, keep, Normalize(0.0, 1.0), "keep weight")
    axes[-1].set_title(f"keep weight A_V ({keep.min():.2f}–{keep.max():.2f})", fontsize=9, y=1.0)
    figure.colorbar(mappable, ax=axes[-1], label="keep probability", shrink=0.85)
    units = "patches" if layout.kind == "grid" else "regions"
    figure.suptitle(f"Significance adapter: kept {units} (mean keep {keep.mean():.2f})", fontsize=10)
    return figure


def figure_word_maps(explanation: Explanation) -> Figure:
    """One panel per word: its cosine with every patch/region, the best match outlined."""
    words, similarity = explanation.words, explanation.word_similarity
    title = _wrap(f"Best-matching image tokens per word — “{explanation.caption}”", 22 * min(4, len(words)))
    figure, axes, colour_axes = _small_multiples(len(words), title, explanation.layout.kind == "regions")
    norm = Normalize(float(similarity.min()), float(max(similarity.max(), similarity.min() + 1e-6)))
    mappable = None
    for ax, word, values in zip(axes, words, similarity, strict=True):
        mappable = draw_units(ax, explanation, values, norm, "cosine", mark_best=True)
        ax.set_title(f"“{_short(word)}”  best {values.max():.2f}", fontsize=9, y=1.0)
    figure.colorbar(mappable, cax=colour_axes, label="cosine(word, image token)")
    return figure


def figure_regions(explanation: Explanation, max_panels: int = MAX_REGION_PANELS) -> Figure:
    """Each region prompt's attention map Â, with its mixture weight π and mean variance σ²."""
    num_regions = len(explanation.mixture_weights)
    order = np.argsort(-explanation.mixture_weights, kind="stable")[:max_panels]
    shown = (
        f"top {len(order)} of {num_regions} by mixture weight"
        if len(order) < num_regions
        else f"all {num_regions}"
    )
    title = _wrap(f"Region prompts ({shown}); σ² = mean exp(log σ²)", 22 * min(4, len(order)))
    figure, axes, colour_axes = _small_multiples(len(order), title, explanation.layout.kind == "regions")
    attention = explanation.region_attention
    norm = Normalize(0.0, float(max(attention[order].max(), 1e-6)))
    mappable = None
    for ax, k in zip(axes, order, strict=True):
        mappable = draw_units(ax, explanation, attention[k], norm, "attention")
        pi, variance = explanation.mixture_weights[k], explanation.region_variance[k]
        ax.set_title(f"prompt {k}: π={pi:.2f}, σ²={variance:.2f}", fontsize=9, y=1.0)
    figure.colorbar(mappable, cax=colour_axes, label="region attention Â (sums to 1)")
    return figure


def figure_word_keep(explanation: Explanation) -> Figure:
    """The caption's words with the granularity adapter's keep weight of each (A_T)."""
    words, keep = explanation.words, explanation.word_keep
    width = min(max(4.5, 0.45 * len(words) + 2.0), 16.0)
    figure = _new_figure(width, 3.8)
    ax = figure.subplots()
    cmap, norm = matplotlib.colormaps["viridis"], Normalize(0.0, 1.0)
    ax.bar(np.arange(len(words)), keep, color=cmap(norm(keep)), edgecolor="black", linewidth=0.4)
    ax.set_xticks(np.arange(len(words)))
    longest = max(len(word) for word in words)
    rotate = len(words) > 8 or longest > 8
    ax.set_xticklabels(
        [_short(word) for word in words], rotation=55 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("keep weight A_T")
    if len(words) <= 14:
        for x, value in enumerate(keep):
            ax.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="keep probability")
    figure.suptitle(
        _wrap(f"Granularity adapter: keep weight per word — “{explanation.caption}”", 90), fontsize=10
    )
    return figure


def figure_levels(explanation: Explanation) -> Figure:
    """The score broken into its three levels: each level's similarity and its weighted share."""
    names = ["original  S_ori", "key  S_key", "uncertainty  S_unc"]
    raw = np.array(list(explanation.levels.values()))
    weighted = raw * np.array(explanation.level_weights)
    figure = _new_figure(6.4, 3.2)
    ax = figure.subplots()
    y = np.arange(3)
    ax.barh(y - 0.18, raw, height=0.34, color="#4c72b0", label="level similarity")
    ax.barh(y + 0.18, weighted, height=0.34, color="#dd8452", label="weight × similarity")
    for row in range(3):
        ax.text(raw[row], row - 0.18, f" {raw[row]:.3f}", va="center", fontsize=8)
        ax.text(weighted[row], row + 0.18, f" {weighted[row]:.3f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(
        [f"{n}\n(weight {w:g})" for n, w in zip(names, explanation.level_weights, strict=True)]
    )
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    low, high = min(0.0, raw.min(), weighted.min()), max(raw.max(), weighted.max(), 1e-3)
    ax.set_xlim(low * 1.25, high * 1.3)
    ax.set_xlabel("similarity")
    ax.legend(loc="lower right", fontsize=8)
    a, b, c = explanation.level_weights
    formula = f"{a:g}·{raw[0]:.3f} + {b:g}·{raw[1]:.3f} + {c:g}·{raw[2]:.3f}"
    figure.suptitle(f"GRM score {explanation.score:.3f} = {formula}", fontsize=10)
    return figure


def draw_figures(explanation: Explanation) -> dict[str, Figure]:
    """All figures of an explanation, keyed by `FIGURE_NAMES`."""
    return {
        "kept_patches": figure_kept_patches(explanation),
        "word_maps": figure_word_maps(explanation),
        "regions": figure_regions(explanation),
        "word_keep": figure_word_keep(explanation),
        "levels": figure_levels(explanation),
    }


def save_figures(figures: dict[str, Figure], output_dir: str | Path, prefix: str = "") -> dict[str, Path]:
    """Write each figure as `output_dir/{prefix}{name}.png`; returns name → path."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, figure in figures.items():
        paths[name] = directory / f"{prefix}{name}.png"
        figure.savefig(paths[name], dpi=DPI)
    return paths


def figure_titles(figure: Figure) -> list[str]:
    """The suptitle and every axes title of a figure (for checks and the JSON summary)."""
    titles = [figure.get_suptitle()] if figure.get_suptitle() else []
    return titles + [ax.get_title() for ax in figure.axes if ax.get_title()]
