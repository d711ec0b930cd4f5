"""Encode a gallery once, in batches with a progress bar: images, precomputed regions, or captions.

Each function runs the model in eval mode (restoring its mode afterwards), moves every batch's outputs
to the CPU as it goes (a large gallery never sits in accelerator memory) and returns one concatenated
`GranAlignImageOutput` / `GranAlignTextOutput` whose row `i` is input `i`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from granalign.outputs_granalign import (
    GranAlignImageOutput,
    GranAlignTextOutput,
    concat_image_outputs,
    concat_text_outputs,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "encode_captions",
    "encode_dataset_images",
    "encode_images",
    "encode_regions",
    "list_image_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


def _to_cpu(output: Any) -> Any:
    return type(output)(**{name: value.cpu() for name, value in output.items()})


def _batches(count: int, batch_size: int, description: str, progress: bool) -> Iterator[tuple[int, int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if count == 0:
        raise ValueError(f"nothing to encode: {description} got no items")
    with tqdm(total=count, desc=description, disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield start, stop
            bar.update(stop - start)


def _open_image(item: Any) -> Any:
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as image:
            image.load()
            return image.copy()
    return item


def encode_images(
    model: Any, processor: Any, images: Sequence[Any], batch_size: int = 32, progress: bool = True
) -> GranAlignImageOutput:
    """Encode images (PIL images, arrays, or file paths) → `GranAlignImageOutput` `[N, ...]` on CPU."""
    device, dtype = _device_dtype(model)
    outputs = []
    with _eval_mode(model):
        for start, stop in _batches(len(images), batch_size, "encode images", progress):
            batch = [_open_image(item) for item in images[start:stop]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
            outputs.append(_to_cpu(model.encode_image(pixel_values=pixels.to(device, dtype))))
    return concat_image_outputs(outputs)


def _pad_regions(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(array.shape[0] for array in arrays)
    features = torch.zeros(len(arrays), longest, arrays[0].shape[1])
    mask = torch.zeros(len(arrays), longest, dtype=torch.long)
    for row, array in enumerate(arrays):
        features[row, : array.shape[0]] = torch.from_numpy(array)
        mask[row, : array.shape[0]] = 1
    return features, mask


def encode_regions(
    model: Any, regions: Sequence[Any], batch_size: int = 64, progress: bool = True
) -> GranAlignImageOutput:
    """Encode precomputed region features (one `[N_i, D]` array per image) → `GranAlignImageOutput` on CPU."""
    device, dtype = _device_dtype(model)
    outputs = []
    with _eval_mode(model):
        for start, stop in _batches(len(regions), batch_size, "encode regions", progress):
            arrays = [np.asarray(item, dtype=np.float32) for item in regions[start:stop]]
            for offset, array in enumerate(arrays):
                if array.ndim != 2 or array.shape[0] == 0:
                    raise ValueError(
                        f"regions[{start + offset}] must be a non-empty [N, D] array, got {array.shape}"
                    )
            features, mask = _pad_regions(arrays)
            out = model.encode_image(region_features=features.to(device, dtype), region_mask=mask.to(device))
            outputs.append(_to_cpu(out))
    return concat_image_outputs(outputs)


def encode_captions(
    model: Any, processor: Any, captions: Sequence[str], batch_size: int = 64, progress: bool = True
) -> GranAlignTextOutput:
    """Encode captions (each batch padded to its longest) → `GranAlignTextOutput` `[N, ...]` on CPU."""
    device, _ = _device_dtype(model)
    outputs = []
    with _eval_mode(model):
        for start, stop in _batches(len(captions), batch_size, "encode captions", progress):
            inputs = processor(text=list(captions[start:stop]), padding="longest", return_tensors="pt")
            out = model.encode_text(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
            outputs.append(_to_cpu(out))
    return concat_text_outputs(outputs)


def encode_dataset_images(
    model: Any, processor: Any, split: Any, batch_size: int = 32, progress: bool = True
) -> tuple[GranAlignImageOutput, list[str]]:
    """Encode the images (`image` column) or regions (`region_features`) of a `datasets.Dataset` split.

    Returns the outputs and the item ids (the `image_id` column, else the row numbers as strings).
    """
    columns = split.column_names
    ids = (
        [str(v) for v in split["image_id"]] if "image_id" in columns else [str(i) for i in range(len(split))]
    )
    if "region_features" in columns:
        table = split.with_format("numpy", columns=["region_features"])
        regions = _LazyColumn(table, "region_features")
        return encode_regions(model, regions, batch_size, progress), ids
    if "image" not in columns:
        raise ValueError(
            f"the split has neither an 'image' nor a 'region_features' column (columns: {columns})"
        )
    return encode_images(model, processor, _LazyColumn(split, "image"), batch_size, progress), ids


class _LazyColumn(Sequence):
    """A dataset column read batch by batch (slices only), so a large split is never decoded at once."""

    def __init__(self, table: Any, column: str) -> None:
        self.table, self.column = table, column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return list(self.table[item][self.column])
        return self.table[int(item)][self.column]
