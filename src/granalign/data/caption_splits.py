"""From captioned, rendered images to train/validation/test rows, split by caption string.

Shared by the rendered-SVG sources (`openclipart`, `openmoji`):
- `cap_per_caption`: at most `max_per_caption` images per caption (`caption_key`: case- and
  whitespace-insensitive), the first ones in a fixed order (`fixed_order`: the SHA-256 of the image id);
- `split_rendered`: drops images whose render failed and exact duplicates (same caption, same pixels),
  then puts each row in the split of its caption (`assign_split`), so all images of a caption share a
  split and no test caption is seen in training;
- `select_render_split`: all of the above plus rendering what the cache lacks, the shared tail of both
  loaders, with an `Outcome` that writes their common summary;
- `assign_split`: the split from a hash of `(split_seed, caption)`, by `split_fractions` or, with
  `fold`, by `num_folds` equal buckets (k-fold cross-validation: every caption is tested once).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from datasets import DatasetDict

from .captions import caption_key
from .checks import build_image_split
from .render_cache import RenderCache, RunJobs
from .reporting import report
from .schema import SPLITS


@dataclass(frozen=True)
class Candidate:
    """An image that may become a row: its id, its caption and the content hash of its SVG."""

    image_id: str
    caption: str
    digest: str


@dataclass
class Dropped:
    """Rows `split_rendered` left out, and why."""

    failed: int = 0
    timeouts: int = 0
    duplicates: int = 0


Columns = dict[str, tuple[list[str], list[str], list[list[str]]]]
"""Split -> `(image ids, PNG paths, caption lists)`."""


@dataclass(frozen=True)
class Selection:
    """A loader's validated cap, limit and split options (`check_selection_options`): which rendered
    images become rows, and the split of each."""

    max_per_caption: int | None
    limit: int | None
    split_fractions: tuple[float, ...]
    split_seed: int
    fold: int | None
    num_folds: int

    def split_of(self, caption: str) -> str:
        """The split of every image with this caption (`assign_split`)."""
        return assign_split(caption, self.split_seed, self.split_fractions, self.fold, self.num_folds)


def check_selection_options(
    max_per_caption: int | None,
    limit: int | None,
    split_fractions: Sequence[float],
    split_seed: int,
    fold: int | None,
    num_folds: int,
) -> Selection:
    """Validate the cap, limit and split options (the split fractions become floats)."""
    if not isinstance(num_folds, int) or isinstance(num_folds, bool) or num_folds < 3:
        raise ValueError(
            f"num_folds must be an int >= 3 (test, validation and train folds), got {num_folds!r}"
        )
    if fold is not None and (
        not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < num_folds
    ):
        raise ValueError(
            f"fold must be None or an int in [0, {num_folds}) (num_folds={num_folds}), got {fold!r}"
        )
    if max_per_caption is not None and (not isinstance(max_per_caption, int) or max_per_caption < 1):
        raise ValueError(f"max_per_caption must be an int >= 1 or None, got {max_per_caption!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers (train, validation, test) "
            f"summing to 1, got {split_fractions!r}"
        )
    return Selection(max_per_caption, limit, fractions, split_seed, fold, num_folds)


def fixed_order(image_id: str) -> str:
    """The sort key that decides which images of a caption are kept: the SHA-256 of the image id."""
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def cap_per_caption(
    candidates: Iterable[Candidate], max_per_caption: int | None
) -> tuple[list[Candidate], int]:
    """`(kept, number capped away)`: the first `max_per_caption` candidates of each caption, in the
    order given (sort by `fixed_order` first); None keeps all."""
    per_caption: dict[str, int] = {}
    kept: list[Candidate] = []
    capped = 0
    for candidate in candidates:
        key = caption_key(candidate.caption)
        if max_per_caption is not None and per_caption.get(key, 0) >= max_per_caption:
            capped += 1
            continue
        per_caption[key] = per_caption.get(key, 0) + 1
        kept.append(candidate)
    return kept, capped


def assign_split(
    caption: str,
    split_seed: int,
    split_fractions: Sequence[float],
    fold: int | None = None,
    num_folds: int = 10,
) -> str:
    """The split of every image with this caption, from a hash of `(split_seed, caption_key(caption))`.

    With `fold`, the hash puts each caption in one of `num_folds` equal buckets instead of the fractions:
    bucket `fold` is the test split, bucket `fold + 1` (mod `num_folds`) the validation split and the rest
    train, so the test splits of folds `0 .. num_folds - 1` are disjoint and hold every caption once."""
    digest = hashlib.sha256(f"{split_seed}\0{caption_key(caption)}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if fold is not None:
        bucket = int(point * num_folds)
        return "test" if bucket == fold else "validation" if bucket == (fold + 1) % num_folds else "train"
    total = 0.0
    for split, fraction in zip(SPLITS, split_fractions, strict=True):
        total += fraction
        if point < total:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(split_fractions), strict=True) if f > 0)


def split_rendered(
    selected: Iterable[Candidate], cache: RenderCache, selection: Selection
) -> tuple[Columns, Dropped]:
    """The rows of the `selected` candidates (in their order) by split, and what was dropped: failed
    renders, then exact duplicates (same `caption_key`, same pixels; the first one is kept)."""
    dropped = Dropped()
    seen: set[str] = set()
    columns: Columns = {split: ([], [], []) for split in SPLITS}
    for candidate in selected:
        result = cache.result(candidate.digest)
        if "pixels" not in result:
            dropped.failed += 1
            dropped.timeouts += "timeout" in result
            continue
        key = hashlib.sha256(f"{caption_key(candidate.caption)}\0{result['pixels']}".encode()).hexdigest()
        if key in seen:
            dropped.duplicates += 1
            continue
        seen.add(key)
        ids, paths, captions = columns[selection.split_of(candidate.caption)]
        ids.append(candidate.image_id)
        paths.append(os.fspath(cache.png_path(candidate.digest)))
        captions.append([candidate.caption])
    return columns, dropped


def build_splits(columns: Columns, wanted: Sequence[str], where: str) -> DatasetDict:
    """The `wanted` splits of `columns` as image splits (the image column holds the PNG paths)."""
    result = DatasetDict()
    for split in wanted:
        ids, paths, captions = columns[split]
        result[split] = build_image_split(ids, paths, captions, f"{where} [{split}]")
    return result


@dataclass
class Outcome:
    """What `select_render_split` did: images capped away, selected and rendered now, rows dropped after
    rendering, and rows per split."""

    max_per_caption: int | None
    capped: int
    selected: int
    rendered_now: int
    dropped: Dropped
    rows: dict[str, int]

    def summary(self) -> str:
        """The part of a loader's summary line that every rendered-SVG source shares."""
        d = self.dropped
        rows = ", ".join(f"{split}={n}" for split, n in self.rows.items())
        return (
            f"{self.capped} capped away (max {self.max_per_caption} per caption), {self.selected} selected, "
            f"{self.rendered_now} rendered now, {d.failed} render failures ({d.timeouts} timeouts), "
            f"{d.duplicates} duplicates dropped; rows: {rows}"
        )


def select_render_split(
    candidates: Iterable[Candidate],
    svg_path: Callable[[Candidate], str],
    cache: RenderCache,
    render: RunJobs,
    selection: Selection,
    *,
    render_timeout: float,
    wanted: Sequence[str],
    source: str,
    location: str | os.PathLike,
    logger: logging.Logger,
) -> tuple[DatasetDict, Outcome]:
    """Cap the `candidates` per caption (in the order given), keep the first `selection.limit`, render
    what `cache` lacks (`svg_path` of a candidate; `render` gets the `(svg path, png path)` jobs), drop
    failures and duplicates, and split by caption into the `wanted` image splits. `source` (the loader's
    name) and `location` (its folder) name the data in logs and errors."""
    selected, capped = cap_per_caption(candidates, selection.max_per_caption)
    if selection.limit is not None:
        selected = selected[: selection.limit]
    todo = cache.missing(((c.digest, svg_path(c)) for c in selected), render_timeout)
    if todo:
        report(logger, "%s: rendering %d files into %s", source, len(todo), cache.folder)
        cache.render(todo, render)
    columns, dropped = split_rendered(selected, cache, selection)
    result = build_splits(columns, wanted, f"{source} {location}")
    rows = {split: len(result[split]) for split in wanted}
    return result, Outcome(selection.max_per_caption, capped, len(selected), len(todo), dropped, rows)
