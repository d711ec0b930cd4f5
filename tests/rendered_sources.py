"""Test helpers shared by the rendered-SVG sources (openclipart, openmoji): run a loader, read its summary."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from granalign.data.schema import SPLITS

SHARED_SUMMARY = {
    "capped": r"(\d+) capped away",
    "selected": r"(\d+) selected",
    "rendered": r"(\d+) rendered now",
    "failed": r"(\d+) render failures",
    "timeouts": r"\((\d+) timeouts\)",
    "duplicates": r"(\d+) duplicates dropped",
}
"""The counts of `caption_splits.Outcome.summary`, the part every source's summary line shares."""


def summary_counts(line: str, own: dict[str, str]) -> dict[str, int | None]:
    """The counts of a summary line: the source's `own` patterns, the shared ones, and rows per split
    (None for a split the line does not list)."""
    patterns = {**own, **SHARED_SUMMARY}
    counts: dict[str, int | None] = {name: int(re.search(p, line).group(1)) for name, p in patterns.items()}
    for split in SPLITS:
        found = re.search(rf"{split}=(\d+)", line)
        counts[split] = int(found.group(1)) if found else None
    return counts


def load_with_summary(
    loader: Callable[..., Any],
    logger_name: str,
    marker: str,
    own: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    *args: Any,
    **kwargs: Any,
) -> tuple[Any, dict[str, int | None]]:
    """`loader(*args, **kwargs)` (one worker, 32 px unless given) and the counts of the one summary line,
    the logged message that contains `marker`."""
    kwargs.setdefault("num_proc", 1)
    kwargs.setdefault("image_size", 32)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger_name):
        dataset = loader(*args, **kwargs)
    lines = [r.getMessage() for r in caplog.records if marker in r.getMessage()]
    assert len(lines) == 1, lines
    return dataset, summary_counts(lines[0], own)


def rows(dataset) -> dict[str, str]:
    """image_id -> its (single) caption, over all splits."""
    result = {}
    for split in dataset.values():
        for image_id, captions in zip(split["image_id"], split["captions"], strict=True):
            assert len(captions) == 1
            result[image_id] = captions[0]
    return result
