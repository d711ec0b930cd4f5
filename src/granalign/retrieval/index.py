"""A gallery of encoded images or captions, stored once and searched many times.

On disk an index is one safetensors file. Tensors (N items, L tokens, K regions, d embedding size):

| modality | tensors |
|---|---|
| image | `tokens [N, L_v, d]`, `token_mask [N, L_v]` (uint8), `keep_weights [N, L_v]`, `region_tokens [N, K, d]`, `image_embeds [N, d]` |
| text  | `tokens [N, L_t, d]`, `token_mask [N, L_t]` (uint8), `keep_weights [N, L_t]`, `text_embeds [N, d]` |

Float tensors are stored in the index dtype (float32, float16 or bfloat16) and scored in float32.
The header metadata (all strings) holds `format` ("granalign-gallery"), `feature_version`, `modality`,
`dtype`, `model_fingerprint` / `model_revision` / `model_name_or_path` (see `fingerprint.py`),
`num_items`, `ids` (JSON list, unique) and, for captions, `texts` (JSON list).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from granalign.outputs_granalign import (
    GranAlignImageOutput,
    GranAlignTextOutput,
    concat_image_outputs,
    concat_text_outputs,
)
from granalign.retrieval.fingerprint import describe_model, model_fingerprint, model_revision

__all__ = ["FEATURE_VERSION", "INDEX_FORMAT", "STORAGE_DTYPES", "GalleryIndex"]

INDEX_FORMAT = "granalign-gallery"
#: Bumped whenever the stored fields or their meaning change; older files are refused.
FEATURE_VERSION = 1
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FIELDS = {
    "image": ("tokens", "token_mask", "keep_weights", "region_tokens", "image_embeds"),
    "text": ("tokens", "token_mask", "keep_weights", "text_embeds"),
}
#: Fields a model variant may lack: images of a model without region prompting have no region tokens
#: (such an index says so in its header, `"region_tokens": "absent"`, and searches without that level).
_OPTIONAL = {"region_tokens"}
_ABSENT = "absent"
_REQUIRED_META = ("ids", "model_fingerprint", "dtype")
_OUTPUT_TYPES = {"image": GranAlignImageOutput, "text": GranAlignTextOutput}
_CONCAT = {"image": concat_image_outputs, "text": concat_text_outputs}


def _open_index(path: Path) -> Any:
    """`safe_open` of an index file, with one-line errors for a missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"no gallery index at {str(path)!r}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(
            f"{str(path)!r} is not a readable gallery index (a safetensors file): {error}"
        ) from None


def _check_header(path: Path, meta: dict[str, str]) -> str:
    """Refuse a header of another format, feature version or modality; return the modality."""
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{str(path)!r} is not a granalign gallery index (format {meta.get('format')!r})")
    version = meta.get("feature_version")
    if version != str(FEATURE_VERSION):
        raise ValueError(
            f"{str(path)!r} has feature version {version}, but this granalign reads version "
            f"{FEATURE_VERSION}: rebuild the index with `granalign index`"
        )
    modality = meta.get("modality")
    if modality not in _FIELDS:
        raise ValueError(f"{str(path)!r}: unknown index modality {modality!r}; expected image or text")
    return modality


def _header_ids(path: Path, meta: dict[str, str]) -> tuple[list[Any], list[str] | None]:
    """The ids and texts (or None) a header holds, as JSON."""
    try:
        ids = json.loads(meta["ids"])
        texts = json.loads(meta["texts"]) if "texts" in meta else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r}: the header's ids/texts are not valid JSON ({error})") from None
    return ids, texts


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"index dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return name


def _modality_of(outputs: Any) -> str:
    if isinstance(outputs, GranAlignImageOutput):
        return "image"
    if isinstance(outputs, GranAlignTextOutput):
        return "text"
    raise ValueError(f"expected a GranAlignImageOutput or GranAlignTextOutput, got {type(outputs).__name__}")


# Each field's expected shape, in the dimension names of `tokens [N, L, d]` (K: regions, any count).
_SHAPES = {
    "tokens": "NLd",
    "token_mask": "NL",
    "keep_weights": "NL",
    "region_tokens": "NKd",
    "image_embeds": "Nd",
    "text_embeds": "Nd",
}


def _check_consistent(fields: dict[str, torch.Tensor], modality: str) -> None:
    """Every field has its shape (one N, L and d for all), only finite numbers and a 0/1 token mask."""
    sizes: dict[str, int] = {}
    for name, value in fields.items():
        dims = _SHAPES[name]
        if value.dim() != len(dims):
            raise ValueError(
                f"the {modality} index's {name} must be [{', '.join(dims)}], got {list(value.shape)}"
            )
        for dim, size in zip(dims, value.shape, strict=True):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(
                    f"the {modality} index's tensors disagree: {name} has {dim}={size}, another field "
                    f"{sizes[dim]} (shapes { ({k: list(v.shape) for k, v in fields.items()}) })"
                )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = (~torch.isfinite(value)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"the {modality} index's {name} holds NaN or infinite values, at items {bad[:5]} "
                f"({len(bad)} in all): they would rank first (or last) for every query"
            )
    mask = fields["token_mask"]
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"the {modality} index's token_mask must hold only 0 and 1")


def _present(fields: Any, modality: str) -> tuple[str, ...]:
    """The stored fields of `modality` that `fields` (outputs, or a file's tensor names) hold."""
    return tuple(name for name in _FIELDS[modality] if name not in _OPTIONAL or name in fields)


def _storable(outputs: Any, modality: str, dtype: torch.dtype) -> Any:
    """Keep the scoring fields, on CPU, floats in `dtype` and masks as uint8, after checking them."""
    fields = {}
    for name in _FIELDS[modality]:
        value = getattr(outputs, name, None)
        if value is None and name in _OPTIONAL:
            continue
        if value is None:
            raise ValueError(f"the {modality} outputs lack {name!r}, which the index needs")
        fields[name] = value.detach().cpu()
    _check_consistent(fields, modality)
    for name, value in fields.items():
        fields[name] = value.to(torch.uint8) if name == "token_mask" else value.to(dtype)
    return _OUTPUT_TYPES[modality](**fields)


class GalleryIndex:
    """Encoded gallery items with their ids and the model revision that encoded them.

    Example:
    ```python
    >>> images = encode_images(model, processor, paths)                 # GranAlignImageOutput
    >>> index = GalleryIndex.build(model, images, ids=[str(p) for p in paths], dtype="float16")
    >>> index.save("gallery.safetensors")
    >>> index = GalleryIndex.load("gallery.safetensors", model=model)  # refuses another model
    ```
    """

    def __init__(
        self,
        outputs: GranAlignImageOutput | GranAlignTextOutput,
        ids: Sequence[str],
        model_fingerprint: str,
        model_revision: str | None = None,
        model_name_or_path: str | None = None,
        texts: Sequence[str] | None = None,
        dtype: torch.dtype | str = "float32",
    ) -> None:
        self.modality = _modality_of(outputs)
        self.dtype_name = _dtype_name(dtype)
        self.outputs = _storable(outputs, self.modality, STORAGE_DTYPES[self.dtype_name])
        self.ids: list[str] = []
        self.texts: list[str] | None = [] if self.modality == "text" and texts is not None else None
        self.model_fingerprint = model_fingerprint
        self.model_revision = model_revision
        self.model_name_or_path = model_name_or_path
        self._shortlist = None
        count = self.outputs.tokens.shape[0]
        self._extend_ids(ids, texts, count)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        model: Any,
        outputs: GranAlignImageOutput | GranAlignTextOutput,
        ids: Sequence[str],
        texts: Sequence[str] | None = None,
        dtype: torch.dtype | str = "float32",
    ) -> GalleryIndex:
        """An index of `outputs` (from `model.encode_image`/`encode_text`) with one id per item."""
        name = getattr(model.config, "_name_or_path", None) or None
        return cls(outputs, ids, model_fingerprint(model), model_revision(model), name, texts, dtype)

    def _extend_ids(self, ids: Sequence[str], texts: Sequence[str] | None, count: int) -> None:
        ids = [str(item) for item in ids]
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} encoded items; expected one id per item")
        repeated = sorted(item for item, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"item ids must be unique; repeated: {repeated[:5]}")
        clashes = sorted(set(ids).intersection(self.ids))
        if clashes:
            raise ValueError(f"item ids already in the index: {clashes[:5]} ({len(clashes)} in all)")
        if texts is not None:
            if self.modality != "text":
                raise ValueError("texts (captions) can only be stored in a text index")
            if len(texts) != count:
                raise ValueError(f"got {len(texts)} texts for {count} encoded items")
        if self.texts is not None and texts is None and count:
            raise ValueError("this index stores caption texts: pass texts for the new items too")
        self.ids.extend(ids)
        if self.texts is not None and texts is not None:
            self.texts.extend(str(t) for t in texts)

    def add(
        self,
        outputs: GranAlignImageOutput | GranAlignTextOutput,
        ids: Sequence[str],
        texts: Sequence[str] | None = None,
        model: Any = None,
    ) -> GalleryIndex:
        """Append encoded items (ids must be new). Pass the encoding `model` to check its revision."""
        if model is not None:
            self.check_model(model)
        modality = _modality_of(outputs)
        if modality != self.modality:
            raise ValueError(f"cannot add {modality} items to an index of {self.modality}s")
        new = _storable(outputs, modality, STORAGE_DTYPES[self.dtype_name])
        have, adding = _present(self.outputs, modality), _present(new, modality)
        if have != adding:
            raise ValueError(
                f"the new items store {list(adding)} but this index stores {list(have)}: items of one index "
                "must come from one model"
            )
        self._extend_ids(ids, texts, new.tokens.shape[0])
        self.outputs = _CONCAT[modality]([self.outputs, new])
        self._shortlist = None
        return self

    # ------------------------------------------------------------------ accessors

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({len(self)} {self.modality}s, dtype={self.dtype_name}, "
            f"model={describe_model(self.model_fingerprint, self.model_revision, self.model_name_or_path)})"
        )

    @property
    def embeddings(self) -> torch.Tensor:
        """Unit global embeddings `[N, d]` of the items (for the shortlist stage)."""
        return self.outputs.image_embeds if self.modality == "image" else self.outputs.text_embeds

    def shortlister(self, faiss_factory: str = "Flat") -> Any:
        """The (cached) `EmbeddingShortlist` over `embeddings`; rebuilt after `add`."""
        from granalign.retrieval.shortlist import EmbeddingShortlist

        if self._shortlist is None or self._shortlist.faiss_factory != faiss_factory:
            self._shortlist = EmbeddingShortlist(self.embeddings, faiss_factory)
        return self._shortlist

    def check_model(self, model: Any) -> None:
        """Raise `ValueError` naming both revisions unless `model` is the one that built this index."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model_fingerprint:
            name = getattr(model.config, "_name_or_path", None) or None
            raise ValueError(
                "this index was built by model "
                f"{describe_model(self.model_fingerprint, self.model_revision, self.model_name_or_path)}, "
                f"not by the given model {describe_model(fingerprint, model_revision(model), name)}: "
                "its features cannot be scored against this model's; rebuild the index with this model"
            )

    # ------------------------------------------------------------------ persistence

    def metadata(self) -> dict[str, str]:
        """The header metadata written by `save` (all values are strings)."""
        meta = {
            "format": INDEX_FORMAT,
            "feature_version": str(FEATURE_VERSION),
            "modality": self.modality,
            "dtype": self.dtype_name,
            "model_fingerprint": self.model_fingerprint,
            "model_revision": self.model_revision or "",
            "model_name_or_path": self.model_name_or_path or "",
            "num_items": str(len(self)),
            "ids": json.dumps(self.ids),
        }
        if self.texts is not None:
            meta["texts"] = json.dumps(self.texts)
        for name in _OPTIONAL.intersection(_FIELDS[self.modality]):
            if getattr(self.outputs, name) is None:
                meta[name] = _ABSENT
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to `path` (one safetensors file), atomically (write a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: getattr(self.outputs, name).contiguous() for name in _present(self.outputs, self.modality)
        }
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as error:  # e.g. a full disk; the partial file is removed below
            raise OSError(f"could not write the gallery index {str(path)!r}: {error}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @staticmethod
    def read_ids(path: str | os.PathLike) -> list[str]:
        """The item ids of the index at `path`, from its checked header (no tensor is read)."""
        path = Path(path)
        with _open_index(path) as handle:
            meta = handle.metadata() or {}
        _check_header(path, meta)
        if "ids" not in meta:
            raise ValueError(f"{str(path)!r} is a damaged gallery index: it lacks ['ids']")
        return [str(item) for item in _header_ids(path, meta)[0]]

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> GalleryIndex:
        """Read an index; with `model`, refuse it unless that model built it (see `check_model`)."""
        path = Path(path)
        with _open_index(path) as handle:
            meta = handle.metadata() or {}
            modality = _check_header(path, meta)
            stored = [name for name in _FIELDS[modality] if meta.get(name) != _ABSENT]
            missing = [name for name in (*stored, *_REQUIRED_META) if name not in {*handle.keys(), *meta}]
            if missing:
                raise ValueError(f"{str(path)!r} is a damaged gallery index: it lacks {missing}")
            fields = {name: handle.get_tensor(name) for name in stored}
        ids, texts = _header_ids(path, meta)
        try:
            index = cls(
                _OUTPUT_TYPES[modality](**fields),
                ids,
                meta["model_fingerprint"],
                meta.get("model_revision") or None,
                meta.get("model_name_or_path") or None,
                texts,
                meta["dtype"],
            )
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}") from None
        if model is not None:
            index.check_model(model)
        return index
