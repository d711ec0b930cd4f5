"""Token outputs of frozen towers, computed once per item and memory-mapped from disk.

With `model.freeze_vision_tower` / `model.freeze_text_tower` a tower's output for an item never changes,
so it is computed once (without augmentation, in eval mode) and training runs only the GRM parts on top:
`encode_image(vision_hidden_states=...)` / `encode_text(text_hidden_states=..., attention_mask=...)`.

The cache is a per-item store: `<cache_dir>/<kind>-<fingerprint>/shard-*/` (`states.npy` `[n, L, h]`,
`lengths.npy` `[n]`, `keys.json`: the items' content keys), each shard written to a temporary folder and
renamed, so a killed run never leaves a half shard. The fingerprint hashes the tower's weights, the
preprocessing (tokenizer vocabulary and length, or the image processor's settings) and the storage dtype,
so a changed tower or processor never reads a stale cache. An item's key is the SHA-256 of its content (the
caption string, or the image file's bytes): any split, fold or dataset that holds an item already in the
store reuses its states, and only new items are encoded (into a new shard). An image's mirror image
(`augment.cache_flipped_images`, a training view) is another item of the same store, keyed
`mirror:<key>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import ImageOps
from tqdm.auto import tqdm

__all__ = [
    "SplitStates",
    "TowerStates",
    "build_split_states",
    "cache_image_states",
    "cache_text_states",
    "default_cache_dir",
]

_VERSION = "tower-states-v2"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def default_cache_dir() -> Path:
    """`$GRANALIGN_CACHE/tower_states`, else `~/.cache/granalign/tower_states`."""
    root = os.environ.get("GRANALIGN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "granalign"
    return base / "tower_states"


class TowerStates:
    """One frozen tower's outputs for N items, gathered from the store's memory-mapped shards.

    Item `i` is row `rows[i]` of `shards[shard_of[i]]` (`[n, L_s, h]`), with `lengths[i]` real tokens.
    `path` is the store folder; `encoded` counts the items this call had to run the tower for."""

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        shard_of: np.ndarray,
        rows: np.ndarray,
        lengths: np.ndarray,
        path: Path,
        encoded: int = 0,
    ) -> None:
        self.shards = list(shards)
        self.shard_of, self.rows, self.lengths = shard_of, rows, lengths
        self.path, self.encoded = path, encoded
        self.hidden = int(self.shards[0].shape[2]) if self.shards else 0

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """States `[B, L_max, h]` (float32, cut to the longest item) and mask `[B, L_max]` (long)."""
        index = np.asarray(indices, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"item index out of range for a cache of {len(self)} items: {index.tolist()}")
        lengths = self.lengths[index]
        width = int(lengths.max()) if index.size else 0
        out = np.zeros((len(index), width, self.hidden), dtype=np.float32)
        shard_of = self.shard_of[index]
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            states = self.shards[shard]
            cut = min(width, states.shape[1])
            out[where, :cut] = states[self.rows[index[where]], :cut]
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return torch.from_numpy(out), mask


@dataclass
class SplitStates:
    """The caches of one split: images by row, captions in row order (`None` for a trainable tower), and
    the images' mirror images by row when the split trains with cached flips."""

    images: TowerStates | None = None
    texts: TowerStates | None = None
    mirrored_images: TowerStates | None = None


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


def _open_store(store: Path) -> tuple[list[np.ndarray], dict[str, tuple[int, int, int]]]:
    """The store's shards (in name order) and key -> (shard, row, length); the first shard holding a key wins."""
    shards: list[np.ndarray] = []
    where: dict[str, tuple[int, int, int]] = {}
    for folder in sorted(store.glob("shard-*")) if store.is_dir() else []:
        if not (folder / "keys.json").is_file():
            continue
        keys = json.loads((folder / "keys.json").read_text(encoding="utf-8"))
        lengths = np.load(folder / "lengths.npy", allow_pickle=False)
        shards.append(np.load(folder / "states.npy", mmap_mode="r", allow_pickle=False))
        for row, key in enumerate(keys):
            where.setdefault(key, (len(shards) - 1, row, int(lengths[row])))
    return shards, where


def _write_shard(
    store: Path, keys: list[str], batches: Iterator, width: int, hidden: int, dtype: str
) -> None:
    """Stream `(start, states [b, l, h], lengths [b])` batches for `keys` into a new shard, atomically."""
    name = f"shard-{uuid.uuid4().hex[:16]}"
    tmp = store / f".tmp-{name}"
    tmp.mkdir(parents=True)
    try:
        states = np.lib.format.open_memmap(
            tmp / "states.npy", mode="w+", dtype=_DTYPES[dtype], shape=(len(keys), width, hidden)
        )
        lengths = np.zeros(len(keys), dtype=np.int64)
        for start, batch_states, batch_lengths in batches:
            stop = start + len(batch_states)
            states[start:stop, : batch_states.shape[1]] = batch_states.numpy().astype(_DTYPES[dtype])
            lengths[start:stop] = batch_lengths.numpy()
        states.flush()
        del states
        np.save(tmp / "lengths.npy", lengths)
        (tmp / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
        os.replace(tmp, store / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gather(store: Path, keys: Sequence[str], encode: Any, dtype: str) -> TowerStates:
    """The states of `keys` from `store`, after `encode(missing_keys) -> (batches, width, hidden)` wrote
    a shard for those the store lacks (each missing key encoded once)."""
    shards, where = _open_store(store)
    missing = list(dict.fromkeys(key for key in keys if key not in where))
    if missing:
        batches, width, hidden = encode(missing)
        _write_shard(store, missing, batches, width, hidden, dtype)
        shards, where = _open_store(store)
    located = np.array([where[key] for key in keys], dtype=np.int64).reshape(len(keys), 3)
    return TowerStates(shards, located[:, 0], located[:, 1], located[:, 2], store, encoded=len(missing))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _bar(total: int, desc: str, progress: bool) -> Any:
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _store(cache_dir: str | os.PathLike[str] | None, kind: str, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{kind}-{key}"


def _content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_keys(split: Dataset, batch_size: int = 256) -> list[str]:
    """One content key per row of `split`: the SHA-256 of the image file's bytes (of the decoded pixels,
    mode and size when the column holds no `datasets.Image` feature)."""
    if not isinstance(split.features.get("image"), ImageFeature):
        keys = []
        for row in range(len(split)):
            image = split[row]["image"]
            keys.append(_content_key(f"{image.mode}{image.size}".encode() + image.tobytes()))
        return keys
    raw = split.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    keys = []
    for start in range(0, len(raw), batch_size):
        for value in raw[start : start + batch_size]["image"]:
            data = value.get("bytes")
            if data is None:
                data = Path(value["path"]).read_bytes()
            keys.append(_content_key(data))
    return keys


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
    """The text tower's outputs for `captions` (tokenised as the processor does), from the item store."""
    if not captions:
        raise ValueError("no captions to cache")
    tokenizer, max_length = processor.tokenizer, processor.max_length
    settings = {
        "tokenizer": type(tokenizer).__name__,
        "vocab": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
        "max_length": max_length,
        "lowercase": getattr(tokenizer, "do_lower_case", None),
    }
    store = _store(cache_dir, "text", _fingerprint("text", model.text_model, settings, [], dtype))
    keys = [_content_key(caption.encode()) for caption in captions]
    by_key = dict(zip(keys, captions, strict=True))
    device = _device(model)

    def encode(missing: list[str]) -> tuple[Iterator, int, int]:
        todo = [by_key[key] for key in missing]
        width = int(processor(text=todo, padding="longest", return_tensors="pt")["input_ids"].shape[1])

        def batches() -> Iterator:
            with _eval_mode(model.text_model), _bar(len(todo), "cache caption states", progress) as bar:
                for start in range(0, len(todo), batch_size):
                    inputs = processor(
                        text=todo[start : start + batch_size], padding="longest", return_tensors="pt"
                    )
                    mask = inputs["attention_mask"].to(device)
                    states = model.text_tower_states(inputs["input_ids"].to(device), mask).float()
                    # real tokens first (left-padding tokenizers too), padding zeroed: `lengths` says all
                    order = torch.argsort(1 - mask, dim=1, stable=True)
                    states = (states * mask[..., None]).gather(1, order[..., None].expand_as(states))
                    yield start, states.cpu(), mask.sum(1).cpu()
                    bar.update(len(states))

        return batches(), width, model.text_projection.in_features

    return _gather(store, keys, encode, dtype)


@torch.no_grad()
def cache_image_states(
    model: Any,
    processor: Any,
    split: Dataset,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    progress: bool = True,
    mirrored: bool = False,
) -> TowerStates:
    """The vision tower's outputs for every image of `split` (as the processor prepares them), from the
    item store: images already there (from any split or dataset) are not encoded again. With `mirrored`,
    the outputs for each image's horizontal mirror image instead (keys `mirror:<key>`)."""
    if "image" not in split.column_names:
        raise ValueError(f"caching vision states needs an 'image' column, got {split.column_names}")
    if len(split) == 0:
        raise ValueError("no images to cache")
    settings = processor.image_processor.to_dict()
    # states that stop before tuned blocks are other states (the key is absent otherwise: old caches stay valid)
    if model.config.vision_tuned_blocks:
        settings["vision_tuned_blocks"] = model.config.vision_tuned_blocks
    store = _store(cache_dir, "image", _fingerprint("image", model.vision_model, settings, [], dtype))
    keys = [f"mirror:{key}" for key in image_keys(split)] if mirrored else image_keys(split)
    first_row = {key: row for row, key in reversed(list(enumerate(keys)))}
    device = _device(model)
    view = ImageOps.mirror if mirrored else (lambda image: image)

    def encode(missing: list[str]) -> tuple[Iterator, int, int]:
        rows = [first_row[key] for key in missing]
        probe = processor(images=[view(split[rows[0]]["image"])], return_tensors="pt")["pixel_values"]
        with _eval_mode(model.vision_model):
            length, hidden = model.vision_tower_states(probe.to(device)).shape[1:]

        def batches() -> Iterator:
            desc = "cache mirrored image states" if mirrored else "cache image states"
            with _eval_mode(model.vision_model), _bar(len(rows), desc, progress) as bar:
                for start in range(0, len(rows), batch_size):
                    images = [view(image) for image in split[rows[start : start + batch_size]]["image"]]
                    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
                    states = model.vision_tower_states(pixels).float().cpu()
                    yield start, states, torch.full((len(states),), length)
                    bar.update(len(states))

        return batches(), int(length), int(hidden)

    return _gather(store, keys, encode, dtype)


def build_split_states(
    model: Any,
    processor: Any,
    split: Dataset | None,
    freeze_vision: bool,
    freeze_text: bool,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    progress: bool = True,
    mirrored: bool = False,
) -> SplitStates:
    """The caches a split needs: images when the vision tower is frozen (and, with `mirrored`, their
    mirror images too), captions when the text tower is."""
    states = SplitStates()
    if split is None:
        return states
    if freeze_vision and model.vision_model is not None:
        states.images = cache_image_states(model, processor, split, cache_dir, dtype, progress=progress)
        if mirrored:
            states.mirrored_images = cache_image_states(
                model, processor, split, cache_dir, dtype, progress=progress, mirrored=True
            )
    if freeze_text:
        captions = [caption for row in split["captions"] for caption in row]
        states.texts = cache_text_states(model, processor, captions, cache_dir, dtype, progress=progress)
    return states
