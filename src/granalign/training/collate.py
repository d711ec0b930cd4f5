"""(image, caption) training pairs over the one-row-per-image schema, and the batch collator.

`CaptionPairDataset` item `i` is the `i`-th caption of the split in row order, with its row's image (or
precomputed regions) and the row index as the image id: captions of the same image share the id, so the
loss does not treat them as negatives of each other; identical caption strings share a caption id, for
the same reason. Augmentation is seeded per (seed, epoch, item), so
an item looks the same whichever process, worker or resumed run loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from granalign.data.captions import caption_ids
from granalign.training.augment import CaptionAugmenter, ImageAugmenter, sample_rng, swap_left_right

__all__ = ["AlignmentCollator", "CaptionPairDataset", "EpochPermutationSampler"]


class CaptionPairDataset(torch.utils.data.Dataset):
    """A map-style view of a split as (image, caption) pairs.

    Args:
        split: a schema split (`image` or `region_features` column, `captions`).
        image_augmenter: training image augmentation (pixels only); `None` leaves images as they are.
        caption_augmenter: training caption corruption; `None` leaves captions as they are.
        flip_swaps_left_right: after a horizontal flip, swap the words "left"/"right" of the caption.
        seed: the augmentation seed; `set_epoch` selects the epoch.
        load_images: False when the images come from a frozen tower's cache (items then carry no image).
        cached_flip_prob: with `load_images=False`, the probability that an item takes its image's cached
            mirror image (`flipped: True` in the item; the collator reads that view).

    Items are dicts with `caption`, `caption_index` (flat, row order), `caption_id` (the same for
    identical caption strings, case and spacing ignored), `image_index` (row) and `image` (PIL) or
    `region_features` (`[N, D]` float32, plus `region_boxes` when the split has them), or `flipped`.
    """

    def __init__(
        self,
        split: Dataset,
        image_augmenter: ImageAugmenter | None = None,
        caption_augmenter: CaptionAugmenter | None = None,
        flip_swaps_left_right: bool = False,
        seed: int = 0,
        load_images: bool = True,
        cached_flip_prob: float = 0.0,
    ) -> None:
        columns = set(split.column_names)
        if "captions" not in columns or ("image" in columns) == ("region_features" in columns):
            raise ValueError(
                "a pair dataset needs a 'captions' column and exactly one of 'image' and 'region_features', "
                f"got columns {sorted(columns)}"
            )
        self.split = split
        self.uses_regions = "region_features" in columns
        if self.uses_regions:
            self.split = split.with_format("numpy", columns=list(columns - {"image_id", "captions"}))
        self.image_augmenter = image_augmenter
        self.caption_augmenter = caption_augmenter
        self.flip_swaps_left_right = flip_swaps_left_right
        self.seed = seed
        self.load_images = load_images
        if cached_flip_prob and load_images:
            raise ValueError("cached_flip_prob flips cached images: it needs load_images=False")
        self.cached_flip_prob = cached_flip_prob
        self.epoch = 0
        self.captions: list[str] = []
        self.rows: list[int] = []
        for row, captions in enumerate(split["captions"]):
            self.captions.extend(captions)
            self.rows.extend([row] * len(captions))
        if not self.captions:
            raise ValueError("the split has no captions to pair with its images")
        self.caption_ids = caption_ids(self.captions).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next items get."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        caption = self.captions[index]
        rng = sample_rng(self.seed, self.epoch, index)
        item: dict[str, Any] = {
            "image_index": row,
            "caption_index": index,
            "caption_id": self.caption_ids[index],
        }
        if self.load_images and self.uses_regions:
            record = self.split[row]
            item["region_features"] = np.asarray(record["region_features"], dtype=np.float32)
            if "region_boxes" in record:
                item["region_boxes"] = np.asarray(record["region_boxes"], dtype=np.float32)
        elif self.load_images:
            image = self.split[row]["image"]
            if self.image_augmenter is not None:
                image, flipped = self.image_augmenter(image, rng)
                if flipped and self.flip_swaps_left_right:
                    caption = swap_left_right(caption)
            item["image"] = image
        elif self.cached_flip_prob:
            item["flipped"] = rng.random() < self.cached_flip_prob
            if item["flipped"] and self.flip_swaps_left_right:
                caption = swap_left_right(caption)
        if self.caption_augmenter is not None:
            caption = self.caption_augmenter(caption, rng)
        item["caption"] = caption
        return item


class AlignmentCollator:
    """Turn a list of pair items into model inputs with the processor, plus `image_ids` and `caption_ids`
    `[B]` (long).

    Args:
        processor: a `GranAlignProcessor` (or any callable with its signature).
        padding: caption padding, "longest" (fastest) or "max_length" (fixed shapes).
        image_states, text_states: frozen towers' cached outputs (`TowerStates`); the batch then holds
            `vision_hidden_states` (by image row) / `text_hidden_states` + `attention_mask` (by caption).
        mirrored_image_states: the cached outputs for the images' mirror images, read for items marked
            `flipped`.
    """

    def __init__(
        self,
        processor: Callable[..., Any],
        padding: str = "longest",
        image_states: Any = None,
        text_states: Any = None,
        mirrored_image_states: Any = None,
    ) -> None:
        self.processor = processor
        self.padding = padding
        self.image_states = image_states
        self.text_states = text_states
        self.mirrored_image_states = mirrored_image_states

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        out = self._caption_inputs(items)
        if self.image_states is not None:
            out["vision_hidden_states"] = self._cached_images(items)
        else:
            out.update(self._image_inputs(items))
        out["image_ids"] = torch.tensor([item["image_index"] for item in items], dtype=torch.long)
        out["caption_ids"] = torch.tensor([item["caption_id"] for item in items], dtype=torch.long)
        return out

    def _cached_images(self, items: list[dict[str, Any]]) -> torch.Tensor:
        """`[B, L, h]` cached image states; items marked `flipped` get their mirror image's."""
        states, _ = self.image_states.batch([item["image_index"] for item in items])
        flipped = [i for i, item in enumerate(items) if item.get("flipped")]
        if flipped:
            if self.mirrored_image_states is None:
                raise ValueError("items are marked flipped but the collator has no mirrored image states")
            mirrored, _ = self.mirrored_image_states.batch([items[i]["image_index"] for i in flipped])
            states[flipped] = mirrored
        return states

    def _caption_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.text_states is not None:
            states, mask = self.text_states.batch([item["caption_index"] for item in items])
            return {"text_hidden_states": states, "attention_mask": mask}
        captions = [item["caption"] for item in items]
        batch = self.processor(text=captions, padding=self.padding, return_tensors="pt")
        return {key: batch[key] for key in ("input_ids", "attention_mask")}

    def _image_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "region_features" in items[0]:
            boxes = [item["region_boxes"] for item in items] if "region_boxes" in items[0] else None
            regions = [item["region_features"] for item in items]
            batch = self.processor(regions=regions, region_boxes=boxes, return_tensors="pt")
        else:
            batch = self.processor(images=[item["image"] for item in items], return_tensors="pt")
        return dict(batch.items())


class EpochPermutationSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation of `range(num_samples)` per epoch, a pure function of (seed, epoch).

    Unlike `RandomSampler` it draws from no global or shared generator, so the order of epoch `e` is the
    same in an uninterrupted run, a resumed run and on every process (accelerate shards the batches).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()
