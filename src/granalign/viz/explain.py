"""What the model sees, as numbers: per-word similarity maps, adapter masks, region maps and level scores.

`compute_explanation` encodes one image (or one set of precomputed region features) and one caption and
returns an `Explanation`: every value is laid out over the image's *visual units*, the spatial tokens of
a vision tower (the patch grid after the [CLS]/register prefix; the last stage's token grid for
Swin/ConvNeXt) or the precomputed regions. `figures.py` draws it; `explain()` computes, draws and saves
the figures (matplotlib, the `viz` extra, is imported only there).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..modeling_granalign import LEVEL_NAMES, GranAlignModel
from ..processing_granalign import open_image, to_rgb_pil

__all__ = [
    "Explanation",
    "VisualLayout",
    "compute_explanation",
    "explain",
    "group_words",
    "infer_grid_shape",
    "load_image",
]

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class VisualLayout:
    """Where the N visual units lie: a `grid` of tokens, `boxes` in pixels, or plain `regions`.

    Attributes:
        kind: "grid" (tokens of a vision tower), "boxes" (regions with boxes) or "regions" (no geometry).
        grid_shape: `(rows, cols)` with rows · cols = N for "grid".
        boxes: `[N, 4]` boxes `x0, y0, x1, y1` in pixels of `image` for "boxes".
        image: `[H, W, 3]` uint8 picture to draw on (for "grid": what the model saw), or None.
    """

    kind: Literal["grid", "boxes", "regions"]
    grid_shape: tuple[int, int] | None = None
    boxes: np.ndarray | None = None
    image: np.ndarray | None = None

    @property
    def num_units(self) -> int:
        if self.kind == "grid":
            return self.grid_shape[0] * self.grid_shape[1]
        return -1 if self.boxes is None else len(self.boxes)


@dataclass
class Explanation:
    """One image-caption pair, explained. W words, N visual units, K regions.

    Attributes:
        caption: the caption as given; words: its W words (special tokens dropped, sub-words merged).
        word_keep: `[W]` granularity-adapter keep weight of each word (mean over its sub-tokens).
        word_similarity: `[W, N]` cosine of each word (mean over its sub-tokens) with each visual unit.
        keep: `[N]` significance-adapter keep weight of each visual unit.
        region_attention: `[K, N]` column-normalised region attention Â (each row sums to 1).
        mixture_weights: `[K]` π; region_variance: `[K]` mean variance exp(log σ²) of each region.
        levels: the three similarity levels ("original", "key", "uncertainty"); level_weights: (a, b, c).
        score: the GRM score a·S_ori + b·S_key + c·S_unc.
        layout: where the visual units lie (see `VisualLayout`).
        prefix_keep: keep weights of the non-spatial prefix tokens ([CLS], registers), if any.
        truncated: the caption was longer than the processor's max_length and was cut.
    """

    caption: str
    words: list[str]
    word_keep: np.ndarray
    word_similarity: np.ndarray
    keep: np.ndarray
    region_attention: np.ndarray
    mixture_weights: np.ndarray
    region_variance: np.ndarray
    levels: dict[str, float]
    level_weights: tuple[float, float, float]
    score: float
    layout: VisualLayout
    prefix_keep: list[float] = field(default_factory=list)
    truncated: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no pictures)."""
        return {
            "caption": self.caption,
            "words": self.words,
            "word_keep": [round(float(v), 6) for v in self.word_keep],
            "levels": self.levels,
            "level_weights": list(self.level_weights),
            "score": self.score,
            "input_kind": self.layout.kind,
            "grid_shape": list(self.layout.grid_shape) if self.layout.grid_shape else None,
            "num_visual_units": int(self.keep.shape[0]),
            "mean_visual_keep": float(self.keep.mean()),
            "prefix_keep": self.prefix_keep,
            "mixture_weights": [round(float(v), 6) for v in self.mixture_weights],
            "region_variance": [round(float(v), 6) for v in self.region_variance],
            "truncated": self.truncated,
        }


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array, converted exactly as the processor converts
    it (`processing_granalign.open_image` / `to_rgb_pil`: modes, 16-bit, alpha on white); clear errors otherwise."""
    if isinstance(image, (str, Path)):
        return open_image(image)
    if not isinstance(image, (Image.Image, np.ndarray)):
        raise TypeError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    return to_rgb_pil(image, "channels_last")


def infer_grid_shape(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The `(rows, cols)` factorisation of `num_tokens` whose aspect is closest to `height / width`."""
    if num_tokens < 1 or height < 1 or width < 1:
        raise ValueError(f"need positive sizes, got num_tokens={num_tokens}, image {height}x{width}")
    target = math.log(height / width)
    pairs = [(r, num_tokens // r) for r in range(1, num_tokens + 1) if num_tokens % r == 0]
    # ties (e.g. a prime count on a square image) go to the wider grid
    return min(pairs, key=lambda rc: (round(abs(math.log(rc[0] / rc[1]) - target), 9), rc[0]))


def group_words(tokenizer: Any, caption: str, encoding: Any) -> list[tuple[str, list[int]]]:
    """Merge sub-word tokens into words and drop special tokens → `[(word, token positions)]`.

    Uses the fast tokenizer's `word_ids` and offsets where available, else WordPiece `##` continuations.
    """
    ids = encoding["input_ids"][0].tolist()
    if getattr(encoding, "is_fast", False) and "offset_mapping" in encoding:
        offsets = encoding["offset_mapping"][0].tolist()
        groups: dict[int, list[int]] = {}
        for position, word in enumerate(encoding.word_ids(0)):
            if word is not None:  # None: [CLS], [SEP], padding
                groups.setdefault(word, []).append(position)
        words = []
        for positions in groups.values():
            start, end = offsets[positions[0]][0], offsets[positions[-1]][1]
            text = caption[start:end].strip() or tokenizer.convert_ids_to_tokens(ids[positions[0]])
            words.append((text, positions))
        return words
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {
        getattr(tokenizer, "unk_token_id", None)
    }
    words: list[tuple[str, list[int]]] = []
    for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if ids[position] in special:
            continue
        if token.startswith("##") and words:
            words[-1] = (words[-1][0] + token[2:], [*words[-1][1], position])
        else:
            words.append((token.lstrip("Ġ▁"), [position]))
    return words


def _display_pixels(pixel_values: torch.Tensor, image_processor: Any) -> np.ndarray:
    """Undo the image processor's normalisation: `[3, H, W]` → `[H, W, 3]` uint8, what the model saw."""
    pixels = pixel_values.detach().float().cpu()
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if getattr(image_processor, "do_normalize", True) and mean is not None and std is not None:
        pixels = pixels * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        scale = 255.0 if getattr(image_processor, "do_rescale", True) else 1.0
        pixels = pixels * scale
    else:  # unknown normalisation: stretch to the full range
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low).clamp_min(1e-6) * 255.0
    return pixels.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


def _check_caption(caption: Any) -> str:
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"caption is empty or whitespace-only ({caption!r}); give a caption with words")
    return caption


def _encode_caption(model: GranAlignModel, processor: Any, caption: str, device: torch.device):
    tokenizer = processor.tokenizer
    max_length = getattr(processor, "max_length", 32)
    encoding = tokenizer(
        caption,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
    )
    full_length = len(tokenizer(caption, truncation=False)["input_ids"])
    text = model.encode_text(encoding["input_ids"].to(device), encoding["attention_mask"].to(device))
    words = group_words(tokenizer, caption, encoding)
    if not words:
        raise ValueError(f"caption {caption!r} has no words the tokenizer keeps (only special tokens)")
    return text, words, full_length > encoding["input_ids"].shape[1]


def _encode_visual(
    model: GranAlignModel,
    processor: Any,
    image: ImageInput | None,
    region_features: Any,
    region_boxes: Any,
    device: torch.device,
):
    """Encode the image side; returns the image output and the layout of its spatial units."""
    if model.config.uses_region_features:
        if region_features is None:
            raise ValueError("this model takes precomputed region features: pass region_features [N, D]")
        batch = processor(
            regions=[region_features], region_boxes=None if region_boxes is None else [region_boxes]
        )
        output = model.encode_image(
            region_features=batch["region_features"].to(device), region_mask=batch["region_mask"].to(device)
        )
        picture = None if image is None else np.asarray(load_image(image))
        if region_boxes is None:
            return output, VisualLayout("regions", boxes=None, image=picture)
        return output, VisualLayout("boxes", boxes=batch["region_boxes"][0].numpy(), image=picture)
    if image is None:
        raise ValueError("this model has a vision tower: pass an image (a path, PIL image or array)")
    if region_features is not None:
        raise ValueError("this model has a vision tower; region_features are for region-feature models")
    if getattr(processor, "image_processor", None) is None:
        raise ValueError("the processor has no image processor, so it cannot prepare an image for this model")
    pixel_values = processor(images=[load_image(image)])["pixel_values"]
    output = model.encode_image(pixel_values=pixel_values.to(device=device, dtype=model.dtype))
    num_spatial = int(output.spatial_mask[0].sum())
    height, width = pixel_values.shape[-2:]
    picture = _display_pixels(pixel_values[0], processor.image_processor)
    return output, VisualLayout(
        "grid", grid_shape=infer_grid_shape(num_spatial, height, width), image=picture
    )


@torch.no_grad()
def compute_explanation(
    model: GranAlignModel,
    processor: Any,
    caption: str,
    image: ImageInput | None = None,
    region_features: Any = None,
    region_boxes: Any = None,
) -> Explanation:
    """Encode one image (or region features) and one caption and collect what explains their score.

    Args:
        model: a `GranAlignModel` (evaluated in eval mode; its mode is restored afterwards).
        processor: its `GranAlignProcessor`.
        caption: the caption to explain.
        image: path, PIL image or array, for a model with a vision tower; with region features, an optional
            picture to draw the boxes on.
        region_features: `[N, D]` features for a region-feature model; region_boxes: optional `[N, 4]`.
    """
    caption = _check_caption(caption)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        img, layout = _encode_visual(model, processor, image, region_features, region_boxes, device)
        txt, words, truncated = _encode_caption(model, processor, caption, device)
        levels = model.level_scores(img, txt)[:, 0, 0].float().cpu()
    finally:
        model.train(was_training)
    spatial = img.spatial_mask[0].bool()
    prefix = (img.token_mask[0].bool() & ~spatial).cpu()
    visual = F.normalize(img.tokens[0][spatial].float(), dim=-1)  # [N, d]
    textual = F.normalize(txt.tokens[0].float(), dim=-1)  # [L_t, d]
    cosine = (textual @ visual.t()).cpu()  # [L_t, N]
    text_keep = txt.keep_weights[0].float().cpu()
    weights = tuple(float(w) for w in model.config.level_weights)
    return Explanation(
        caption=caption,
        words=[word for word, _ in words],
        word_keep=np.array([float(text_keep[p].mean()) for _, p in words]),
        word_similarity=torch.stack([cosine[p].mean(0) for _, p in words]).numpy(),
        keep=img.keep_weights[0][spatial].float().cpu().numpy(),
        region_attention=img.region_attention[0][spatial].float().t().cpu().numpy(),
        mixture_weights=img.mixture_weights[0].float().cpu().numpy(),
        region_variance=img.region_logvars[0].float().exp().mean(-1).cpu().numpy(),
        levels={name: float(v) for name, v in zip(LEVEL_NAMES, levels, strict=True)},
        level_weights=weights,
        score=float(sum(w * float(v) for w, v in zip(weights, levels, strict=True))),
        layout=layout,
        prefix_keep=[float(v) for v in img.keep_weights[0].cpu()[prefix]],
        truncated=truncated,
    )


def explain(
    model: GranAlignModel,
    processor: Any,
    caption: str,
    output_dir: str | Path,
    image: ImageInput | None = None,
    region_features: Any = None,
    region_boxes: Any = None,
    prefix: str = "",
) -> dict[str, Path]:
    """Explain how `model` aligns `caption` with an image (or region features) as PNG figures.

    Writes `kept_patches`, `word_maps`, `regions`, `word_keep` and `levels` PNGs and a `summary` JSON
    (scores, words, keep weights, figure titles) into `output_dir`; returns name → path.

    Example:
        >>> paths = explain(model, processor, "a red circle left of a blue square", "out", image="scene.png")
        >>> sorted(paths)
        ['kept_patches', 'levels', 'regions', 'summary', 'word_keep', 'word_maps']
    """
    from .figures import draw_figures, figure_titles, save_figures  # matplotlib: the `viz` extra

    explanation = compute_explanation(model, processor, caption, image, region_features, region_boxes)
    figures = draw_figures(explanation)
    paths = save_figures(figures, output_dir, prefix)
    summary = {
        **explanation.summary(),
        "figures": {name: figure_titles(figure) for name, figure in figures.items()},
        # the PNG size in pixels, computed as matplotlib's Agg renderer does
        "figure_sizes": {name: [int(f.bbox.width), int(f.bbox.height)] for name, f in figures.items()},
    }
    paths["summary"] = Path(output_dir) / f"{prefix}summary.json"
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
