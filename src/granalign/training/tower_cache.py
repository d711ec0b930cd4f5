"""Token outputs of frozen towers, computed once per item and memory-mapped from disk.

With `model.freeze_vision_tower` / `model.freeze_text_tower` a tower's output for an item never changes,
so it is computed once (without augmentation, in eval mode) and training runs only the GRM parts on top:
`encode_image(vision_hidden_states=...)` / `encode_text(text_hidden_states=..., attention_mask=...)`.

A cache lives in `<cache_dir>/<kind>-<fingerprint>/` (`states.npy` `[N, L, h]`, `lengths.npy` `[N]`,
`info.json`), written to a temporary folder and renamed, so a killed run never leaves a half cache. The
fingerprint hashes the tower's weights, the preprocessing (tokenizer vocabulary and length, or the image
processor's settings), the items (the captions, or the split's `datasets` fingerprint) and the storage
dtype: a changed tower, processor or dataset never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

__all__ = [
    "SplitStates",
    "TowerStates",
    "build_split_states",
    "cache_image_states",
    "cache_text_states",
    "default_cache_dir",
]

_VERSION = "tower-states-v1"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def default_cache_dir() -> Path:
    """`$GRANALIGN_CACHE/tower_states`, else `~/.cache/granalign/tower_states`."""
    root = os.environ.get("GRANALIGN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "granalign"
    return base / "tower_states"


@dataclass
class TowerStates:
    """One frozen tower's outputs for N items: `states` `[N, L, h]` (memory-mapped), `lengths` `[N]`."""

    states: np.ndarray
    lengths: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """States `[B, L_max, h]` (float32, cut to the longest item) and mask `[B, L_max]` (long)."""
        index = np.asarray(indices, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"item index out of range for a cache of {len(self)} items: {index.tolist()}")
        lengths = self.lengths[index]
        width = int(lengths.max()) if index.size else 0
        states = torch.from_numpy(np.asarray(self.states[index, :width], dtype=np.float32))
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return states, mask


@dataclass
class SplitStates:
    """The caches of one split: images by row, captions in row order (`None` for a trainable tower)."""

    images: TowerStates | None = None
    texts: TowerStates | None = None


def _hash_module(digest: Any, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _fingerprint(kind: str, tower: torch.nn.Module, settings: Any, items: Any, dtype: str) -> str:
    digest = hashlib.sha256(f"{_VERSION}|{kind}|{dtype}".encode())
    _hash_module(digest, tower)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps(items, default=str).encode())
    return digest.hexdigest()[:24]


def _open(folder: Path) -> TowerStates | None:
    if not (folder / "info.json").is_file():
        return None
    states = np.load(folder / "states.npy", mmap_mode="r", allow_pickle=False)
    lengths = np.load(folder / "lengths.npy", allow_pickle=False)
    return TowerStates(states, lengths, folder)


def _write(
    folder: Path, batches: Any, num_items: int, width: int, hidden: int, dtype: str, info: dict
) -> TowerStates:
    """Stream `(start, states [b, l, h], lengths [b])` batches into `folder` atomically."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        states = np.lib.format.open_memmap(
            tmp / "states.npy", mode="w+", dtype=_DTYPES[dtype], shape=(num_items, width, hidden)
        )
        lengths = np.zeros(num_items, dtype=np.int64)
        for start, batch_states, batch_lengths in batches:
            stop = start + len(batch_states)
            states[start:stop, : batch_states.shape[1]] = batch_states.numpy().astype(_DTYPES[dtype])
            lengths[start:stop] = batch_lengths.numpy()
        states.flush()
        del states
        np.save(tmp / "lengths.npy", lengths)
        (tmp / "info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        if folder.exists():  # another process finished the same cache first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    opened = _open(folder)
    assert opened is not None
    return opened


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def cache_text_states(
    model: Any,
    processor: Any,
    captions: Sequence[str],
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 128,
    progress: bool = True,
) -> TowerStates:
    """The text tower's outputs for `captions` (tokenised as the processor does), cached on disk."""
    tokenizer, max_length = processor.tokenizer, processor.max_length
    settings = {
        "tokenizer": type(tokenizer).__name__,
        "vocab": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
        "max_length": max_length,
        "lowercase": getattr(tokenizer, "do_lower_case", None),
    }
    items = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    key = _fingerprint("text", model.text_model, settings, [len(captions), items], dtype)
    folder = Path(cache_dir or default_cache_dir()) / f"text-{key}"
    cached = _open(folder)
    if cached is not None:
        return cached
    if not captions:
        raise ValueError("no captions to cache")
    device = _device(model)
    width = int(processor(text=list(captions), padding="longest", return_tensors="pt")["input_ids"].shape[1])
    was_training = model.text_model.training
    model.text_model.eval()

    def batches():
        with tqdm(total=len(captions), desc="cache caption states", disable=not progress, leave=False) as bar:
            for start in range(0, len(captions), batch_size):
                chunk = list(captions[start : start + batch_size])
                inputs = processor(text=chunk, padding="longest", return_tensors="pt")
                mask = inputs["attention_mask"].to(device)
                states = model.text_tower_states(inputs["input_ids"].to(device), mask).float()
                # real tokens first (left-padding tokenizers too), padding zeroed: `lengths` then says all
                order = torch.argsort(1 - mask, dim=1, stable=True)
                states = (states * mask[..., None]).gather(1, order[..., None].expand_as(states))
                yield start, states.cpu(), mask.sum(1).cpu()
                bar.update(len(states))

    hidden = model.text_projection.in_features
    info = {"kind": "text", "items": len(captions), "width": width, "hidden": hidden, "dtype": dtype}
    try:
        return _write(folder, batches(), len(captions), width, hidden, dtype, info)
    finally:
        model.text_model.train(was_training)


@torch.no_grad()
def cache_image_states(
    model: Any,
    processor: Any,
    split: Dataset,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    progress: bool = True,
) -> TowerStates:
    """The vision tower's outputs for every image of `split` (as the processor prepares them), cached."""
    if "image" not in split.column_names:
        raise ValueError(f"caching vision states needs an 'image' column, got {split.column_names}")
    settings = processor.image_processor.to_dict()
    key = _fingerprint("image", model.vision_model, settings, [len(split), split._fingerprint], dtype)
    folder = Path(cache_dir or default_cache_dir()) / f"image-{key}"
    cached = _open(folder)
    if cached is not None:
        return cached
    device = _device(model)
    was_training = model.vision_model.training
    model.vision_model.eval()
    first = model.vision_tower_states(
        processor(images=[split[0]["image"]], return_tensors="pt")["pixel_values"].to(device)
    )
    length, hidden = first.shape[1:]

    def batches():
        with tqdm(total=len(split), desc="cache image states", disable=not progress, leave=False) as bar:
            for start in range(0, len(split), batch_size):
                images = split[start : start + batch_size]["image"]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
                states = model.vision_tower_states(pixels).float().cpu()
                yield start, states, torch.full((len(states),), length)
                bar.update(len(states))

    info = {"kind": "image", "items": len(split), "width": length, "hidden": hidden, "dtype": dtype}
    try:
        return _write(folder, batches(), len(split), length, hidden, dtype, info)
    finally:
        model.vision_model.train(was_training)


def build_split_states(
    model: Any,
    processor: Any,
    split: Dataset | None,
    freeze_vision: bool,
    freeze_text: bool,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    progress: bool = True,
) -> SplitStates:
    """The caches a split needs: images when the vision tower is frozen, captions when the text tower is."""
    states = SplitStates()
    if split is None:
        return states
    if freeze_vision and model.vision_model is not None:
        states.images = cache_image_states(model, processor, split, cache_dir, dtype, progress=progress)
    if freeze_text:
        captions = [caption for row in split["captions"] for caption in row]
        states.texts = cache_text_states(model, processor, captions, cache_dir, dtype, progress=progress)
    return states
