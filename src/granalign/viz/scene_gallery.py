"""Built-in content for the demo: example scenes with captions, and a small in-memory search gallery.

`SceneGallerySearch` is the demo's text → image search backend when no gallery index is given: it renders
built-in synthetic scenes, encodes them once with `model.encode_image` and ranks them for a query with
`model.score`. Any object with the same `search(query, top_k)` method (`ImageSearch`) can replace it,
e.g. an adapter over `granalign.retrieval`'s gallery index.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from ..data.synthetic import SyntheticSceneSpec, generate_synthetic_scenes, render_scene
from ..outputs_granalign import concat_image_outputs

__all__ = ["ExampleScene", "ImageSearch", "SceneGallerySearch", "SearchHit", "example_scenes"]

EXAMPLE_IMAGE_SIZE = 224


@dataclass(frozen=True)
class ExampleScene:
    """A rendered built-in scene, its true captions and one caption of another scene (a distractor)."""

    image_id: str
    image: Image.Image
    captions: tuple[str, ...]
    distractor: str


@dataclass(frozen=True)
class SearchHit:
    """One search result: the image, its id and its score for the query."""

    image: Image.Image
    image_id: str
    score: float


class ImageSearch(Protocol):
    """A text → image search backend for the demo."""

    def search(self, query: str, top_k: int) -> list[SearchHit]: ...


def example_scenes(count: int = 4, image_size: int = EXAMPLE_IMAGE_SIZE, seed: int = 0) -> list[ExampleScene]:
    """`count` built-in test scenes (deterministic in `seed`), each with a distractor caption."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    spec = SyntheticSceneSpec(num_train=0, num_validation=0, num_test=max(count, 2), seed=seed)
    records = generate_synthetic_scenes(spec).splits["test"]
    scenes = []
    for index, record in enumerate(records[:count]):
        other = records[(index + 1) % len(records)]
        distractor = next(
            (c for c in other.caption_texts if c not in record.caption_texts), other.caption_texts[0]
        )
        image = render_scene(record.scene, image_size)
        scenes.append(ExampleScene(record.image_id, image, tuple(record.caption_texts), distractor))
    return scenes


class SceneGallerySearch:
    """Exhaustive GRM search over a few built-in scenes, encoded once on construction.

    Args:
        model: a `GranAlignModel` with a vision tower; processor: its `GranAlignProcessor`.
        num_images: gallery size; image_size: rendered side in pixels; batch_size: encoding batch.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        num_images: int = 12,
        image_size: int = EXAMPLE_IMAGE_SIZE,
        batch_size: int = 16,
        lock: threading.Lock | None = None,
    ) -> None:
        if model.config.uses_region_features:
            raise ValueError(
                "the built-in scene gallery needs a model with a vision tower, not region features"
            )
        self.model, self.processor = model, processor
        self.lock = lock or threading.Lock()
        scenes = example_scenes(num_images, image_size)
        self.images = [scene.image for scene in scenes]
        self.image_ids = [scene.image_id for scene in scenes]
        device = next(model.parameters()).device
        outputs = []
        with self.lock, torch.no_grad():
            for start in range(0, len(self.images), batch_size):
                pixels = processor(images=self.images[start : start + batch_size])["pixel_values"]
                outputs.append(model.encode_image(pixel_values=pixels.to(device=device, dtype=model.dtype)))
        self.gallery = concat_image_outputs(outputs)

    def search(self, query: str, top_k: int = 5) -> list[SearchHit]:
        """The `top_k` gallery images with the highest GRM score for `query`, best first."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"the search query is empty ({query!r}); type a caption to search for")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        device = next(self.model.parameters()).device
        batch = self.processor(text=[query.strip()], padding="longest")
        with self.lock, torch.no_grad():
            text = self.model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores = self.model.score(self.gallery, text)[:, 0].float().cpu()
        order = torch.argsort(scores, descending=True)[:top_k].tolist()
        return [SearchHit(self.images[i], self.image_ids[i], float(scores[i])) for i in order]
