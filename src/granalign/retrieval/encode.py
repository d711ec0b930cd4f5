"""Encode images, precomputed regions or captions once, in batches with a progress bar: the one encode
path, for gallery indices and for evaluation (`granalign.evaluation.runner`).

Each function runs the model in eval mode without gradients (restoring its mode afterwards), moves every
batch's outputs to `output_device` as it goes (default the CPU: a large gallery never sits in accelerator
memory; `None` keeps them where the model is, as evaluation does) and returns one concatenated
`GranAlignImageOutput` / `GranAlignTextOutput` whose row `i` is input `i`. Frozen towers' cached outputs
(`granalign.training.tower_cache.TowerStates`, or anything with its `batch(rows) -> (states, mask)`)
replace the towers where given.

Image files are read with `granalign.processing_granalign.open_image`, the one image loader: an
unreadable one (truncated, empty, not an image, too large) is an `UnreadableImageError` naming it, or, with
`encode_image_files(..., skip_bad=True)`, left out and listed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from granalign.outputs_granalign import (
    GranAlignImageOutput,
    GranAlignTextOutput,
    concat_image_outputs,
    concat_text_outputs,
)
from granalign.processing_granalign import _pad_regions, open_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "UnreadableImageError",
    "encode_captions",
    "encode_dataset_images",
    "encode_image_files",
    "encode_image_states",
    "encode_images",
    "encode_regions",
    "list_image_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UnreadableImageError(ValueError):
    """An image file that cannot be read (truncated, empty, not an image, too large); the message names it."""


def list_image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by `paths`: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no image file or folder at {str(path)!r}")
    return files


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _encode_batches(
    model: Any,
    count: int,
    batch_size: int,
    description: str,
    progress: bool,
    encode_batch: Callable[[int, int, torch.device, torch.dtype], Any],
    output_device: torch.device | str | None,
) -> Any:
    """The encode loop: `encode_batch(start, stop, device, dtype)` for each batch of the `count` items,
    each output moved to `output_device` (None: left where it is), concatenated. A batch may return None
    (all its items skipped); None when every batch did."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if count == 0:
        raise ValueError(f"nothing to encode: {description} got no items")
    device, dtype = _device_dtype(model)
    outputs = []
    with (
        _eval_mode(model),
        tqdm(total=count, desc=description, disable=not progress, dynamic_ncols=True, leave=False) as bar,
    ):
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            output = encode_batch(start, stop, device, dtype)
            bar.update(stop - start)
            if output is None:
                continue
            if output_device is not None:
                output = type(output)(**{name: value.to(output_device) for name, value in output.items()})
            outputs.append(output)
    if not outputs:
        return None
    concat = concat_image_outputs if isinstance(outputs[0], GranAlignImageOutput) else concat_text_outputs
    return concat(outputs)


def _encode_pixels(
    model: Any, processor: Any, images: list[Any], device: torch.device, dtype: torch.dtype
) -> Any:
    """One batch of loaded images through the processor and `encode_image`."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    return model.encode_image(pixel_values=pixels.to(device, dtype))


def _open_image(item: Any) -> Any:
    if isinstance(item, (str, os.PathLike)):
        try:
            return open_image(item)
        except ValueError as error:
            raise UnreadableImageError(str(error)) from None
    return item


def encode_images(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    batch_size: int = 32,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
) -> GranAlignImageOutput:
    """Encode images (PIL images, arrays, or file paths) → `GranAlignImageOutput` `[N, ...]`."""

    def encode_batch(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Any:
        return _encode_pixels(
            model, processor, [_open_image(item) for item in images[start:stop]], device, dtype
        )

    return _encode_batches(
        model, len(images), batch_size, "encode images", progress, encode_batch, output_device
    )


def encode_image_files(
    model: Any,
    processor: Any,
    files: Sequence[str | os.PathLike],
    batch_size: int = 32,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
    skip_bad: bool = False,
    allow_empty: bool = False,
) -> tuple[GranAlignImageOutput | None, list[Path], list[tuple[Path, str]]]:
    """Encode image files → `(outputs, encoded, skipped)`: row `i` of `outputs` is file `encoded[i]`.

    A file that cannot be read raises `UnreadableImageError` naming it; with `skip_bad` it is left out of
    `outputs` and `encoded` and listed in `skipped` as `(file, reason)` (a `ValueError` if no file is left,
    or `outputs` None with `allow_empty`: one chunk of a gallery encoded chunk by chunk).
    """
    paths = [Path(f) for f in files]
    encoded: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def encode_batch(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Any:
        batch = []
        for path in paths[start:stop]:
            try:
                batch.append(_open_image(path))
            except (UnreadableImageError, FileNotFoundError) as error:
                if not skip_bad:
                    raise UnreadableImageError(str(error)) from None
                skipped.append((path, str(error)))
                continue
            encoded.append(path)
        return _encode_pixels(model, processor, batch, device, dtype) if batch else None

    outputs = _encode_batches(
        model, len(paths), batch_size, "encode images", progress, encode_batch, output_device
    )
    if outputs is None and not allow_empty:
        raise ValueError(
            f"none of the {len(paths)} image files can be read, e.g. {skipped[0][1]}; nothing to encode"
        )
    return outputs, encoded, skipped


def encode_regions(
    model: Any,
    regions: Sequence[Any],
    batch_size: int = 64,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
) -> GranAlignImageOutput:
    """Encode precomputed region features (one `[N_i, D]` array per image) → `GranAlignImageOutput`."""

    def encode_batch(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Any:
        arrays = [np.asarray(item, dtype=np.float32) for item in regions[start:stop]]
        for offset, array in enumerate(arrays):
            if array.ndim != 2 or array.shape[0] == 0:
                raise ValueError(
                    f"regions[{start + offset}] must be a non-empty [N, D] array, got {array.shape}"
                )
        features, mask = map(torch.from_numpy, _pad_regions(arrays))  # the processor's padding
        return model.encode_image(region_features=features.to(device, dtype), region_mask=mask.to(device))

    return _encode_batches(
        model, len(regions), batch_size, "encode regions", progress, encode_batch, output_device
    )


def encode_image_states(
    model: Any,
    image_states: Any,
    rows: range,
    batch_size: int = 64,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
) -> GranAlignImageOutput:
    """Encode images `rows` from a frozen vision tower's cached outputs (`image_states.batch(rows)`)."""

    def encode_batch(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Any:
        states, _ = image_states.batch(rows[start:stop])
        return model.encode_image(vision_hidden_states=states.to(device))

    return _encode_batches(
        model, len(rows), batch_size, "encode images", progress, encode_batch, output_device
    )


def encode_captions(
    model: Any,
    processor: Any,
    captions: Sequence[str],
    batch_size: int = 64,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
    text_states: Any = None,
    first_index: int = 0,
) -> GranAlignTextOutput:
    """Encode captions (each batch padded to its longest) → `GranAlignTextOutput` `[N, ...]`.

    `text_states` (a frozen text tower's cached outputs, where `captions[i]` is item `first_index + i`)
    skips the tower; the processor is then not used.
    """

    def encode_batch(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Any:
        if text_states is not None:
            states, mask = text_states.batch(range(first_index + start, first_index + stop))
            return model.encode_text(attention_mask=mask.to(device), text_hidden_states=states.to(device))
        inputs = processor(text=list(captions[start:stop]), padding="longest", return_tensors="pt")
        return model.encode_text(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))

    return _encode_batches(
        model, len(captions), batch_size, "encode captions", progress, encode_batch, output_device
    )


def encode_dataset_images(
    model: Any,
    processor: Any,
    split: Any,
    batch_size: int = 32,
    progress: bool = True,
    output_device: torch.device | str | None = "cpu",
    rows: range | None = None,
    image_states: Any = None,
) -> tuple[GranAlignImageOutput, list[str]]:
    """Encode the images (`image` column) or regions (`region_features`) of a `datasets.Dataset` split.

    `rows` (default all) encodes a contiguous block of the split; `image_states` (a frozen vision tower's
    cached outputs for the split's rows) skips the tower. Returns the outputs and the item ids (the
    `image_id` column, else the row numbers as strings) of those rows.
    """
    rows = range(len(split)) if rows is None else rows
    columns = split.column_names
    if "image_id" in columns:
        ids = [str(v) for v in split.select_columns(["image_id"])[rows.start : rows.stop]["image_id"]]
    else:
        ids = [str(i) for i in rows]
    if image_states is not None:
        outputs = encode_image_states(model, image_states, rows, batch_size, progress, output_device)
        return outputs, ids
    if "region_features" in columns:
        table = split.with_format("numpy", columns=["region_features"])
        regions = _LazyColumn(table, "region_features", rows)
        return encode_regions(model, regions, batch_size, progress, output_device), ids
    if "image" not in columns:
        raise ValueError(
            f"the split has neither an 'image' nor a 'region_features' column (columns: {columns})"
        )
    images = _LazyColumn(split, "image", rows)
    return encode_images(model, processor, images, batch_size, progress, output_device), ids


class _LazyColumn(Sequence):
    """A dataset column over `rows`, read batch by batch (slices only), so a large split is never decoded
    at once."""

    def __init__(self, table: Any, column: str, rows: range) -> None:
        self.table, self.column, self.rows = table, column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            part = self.rows[item]
            if part.step != 1:
                raise ValueError("a lazy dataset column reads contiguous slices only")
            return list(self.table[part.start : part.stop][self.column])
        return self.table[self.rows[int(item)]][self.column]
