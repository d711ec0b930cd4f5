"""Training-time augmentation of captions (word corruption) and images (random resized crop + flip).

Both augmenters take an explicit `random.Random`, so the trainer can seed one per (seed, epoch, sample):
the augmentation of a sample then never depends on worker count, process count or where a resumed run
restarted. Evaluation does not augment; the processor's plain resize is the eval transform.

Caption corruption works on **words** (whitespace-separated), before tokenisation: it is the same for any
tokenizer, and "each word" means a word, not a word piece. A masked word becomes the tokenizer's mask
token string (e.g. `[MASK]`), which the tokenizer maps to its single mask id.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

__all__ = ["CaptionAugmenter", "ImageAugmenter", "caption_vocabulary", "sample_rng", "swap_left_right"]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A `random.Random` determined only by (seed, epoch, index): string seeds hash with SHA-512."""
    return random.Random(f"granalign:{seed}:{epoch}:{index}")


def caption_vocabulary(captions: Iterable[str]) -> tuple[str, ...]:
    """Sorted set of the lower-cased whitespace words of `captions` (replacement words for augmentation)."""
    return tuple(sorted({word for caption in captions for word in caption.lower().split()}))


@dataclass(frozen=True)
class CaptionAugmenter:
    """Corrupt each word with probability `word_prob`: mask (`mask_frac`), replace by a random vocabulary
    word (`replace_frac`) or delete (`delete_frac`); the three fractions sum to 1.

    With `mask_token=None` (a tokenizer without a mask token) masking deletes the word instead. A caption
    whose words would all be deleted is returned unchanged.
    """

    vocabulary: tuple[str, ...]
    mask_token: str | None = "[MASK]"
    word_prob: float = 0.2
    mask_frac: float = 0.5
    replace_frac: float = 0.1
    delete_frac: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 <= self.word_prob <= 1.0:
            raise ValueError(f"word_prob must be in [0, 1], got {self.word_prob!r}")
        total = self.mask_frac + self.replace_frac + self.delete_frac
        if min(self.mask_frac, self.replace_frac, self.delete_frac) < 0 or not math.isclose(total, 1.0):
            raise ValueError(
                f"mask_frac, replace_frac, delete_frac must be >= 0 and sum to 1, got "
                f"{self.mask_frac}, {self.replace_frac}, {self.delete_frac}"
            )
        if self.replace_frac > 0 and not self.vocabulary:
            raise ValueError("replacing words needs a non-empty vocabulary")

    def __call__(self, caption: str, rng: random.Random) -> str:
        words = caption.split()
        out: list[str] = []
        for word in words:
            if rng.random() >= self.word_prob:
                out.append(word)
                continue
            action = rng.random()
            if action < self.mask_frac:
                if self.mask_token is not None:
                    out.append(self.mask_token)
            elif action < self.mask_frac + self.replace_frac:
                out.append(rng.choice(self.vocabulary))
            # else: deleted
        return " ".join(out) if out else caption


@dataclass(frozen=True)
class ImageAugmenter:
    """RandomResizedCrop (area `scale`, aspect `ratio`) to `size` = (height, width), then a horizontal flip
    with probability `flip_prob`. The same algorithm as torchvision's `RandomResizedCrop` (10 tries, then a
    centre crop clamped to `ratio`), written with PIL."""

    size: tuple[int, int]
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1, got {self.size!r}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale!r}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio!r}")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """The crop `(left, top, right, bottom)` for an image of `width` x `height`."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_low, log_high))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return left, top, left + w, top + h
        aspect = width / height  # fallback: centre crop with the aspect clamped to the range
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[Image.Image, bool]:
        """Return the augmented RGB image and whether it was flipped."""
        image = image.convert("RGB")
        box = self.crop_box(image.width, image.height, rng)
        height, width = self.size
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
        flipped = rng.random() < self.flip_prob
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, flipped


_LEFT_RIGHT = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def swap_left_right(caption: str) -> str:
    """Swap the whole words "left" and "right" (for a horizontally flipped image)."""
    out = []
    for token in caption.split(" "):
        core = token.rstrip(".,;:!?")
        tail = token[len(core) :]
        out.append(_LEFT_RIGHT.get(core, core) + tail)
    return " ".join(out)
