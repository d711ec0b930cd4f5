"""When two captions are "the same": one definition for the loaders, the losses and the metrics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["caption_ids", "caption_key", "normalize_caption"]


def normalize_caption(text: str) -> str:
    """`text` with runs of whitespace collapsed to one space and no leading/trailing space."""
    return " ".join(text.split())


def caption_key(caption: str) -> str:
    """The case- and whitespace-insensitive form under which captions count as identical."""
    return normalize_caption(caption).casefold()


def caption_ids(captions: Iterable[str]) -> np.ndarray:
    """`[N]` int64 ids in order of first appearance, equal for captions with the same `caption_key`."""
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(caption_key(str(c)), len(ids)) for c in captions], dtype=np.int64)
