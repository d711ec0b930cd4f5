"""Which model a gallery's features came from: a content fingerprint, and the Hub commit where known.

A gallery index is only valid for the exact model that encoded it: scoring cached features against a
query encoded by another model (another checkpoint, a fine-tuned copy, a changed config) gives silently
wrong rankings. So every index records

* `model_fingerprint(model)`: ``"sha256:<16 hex>"`` over the model's configuration (as JSON, sorted keys,
  without bookkeeping keys that do not change the computation: `transformers_version`, `_name_or_path`,
  `_commit_hash`, `dtype`/`torch_dtype`, `architectures`, `auto_map`, attention-implementation keys) and
  every persistent tensor of its `state_dict` (name, shape, and values **cast to float32**, so loading
  the same checkpoint in bf16/fp16 or on another device gives the same fingerprint);
* `model_revision(model)`: the Hub commit the weights were downloaded at (`config._commit_hash`), or
  `None` for a local directory; shown in messages, never used for the check (a local copy of a Hub
  checkpoint has the same fingerprint but no commit).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["describe_model", "model_fingerprint", "model_revision"]

# Config keys that record where/how a model was loaded, not what it computes.
_VOLATILE_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "architectures",
        "auto_map",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
    }
)


def _clean(value: Any) -> Any:
    """Drop volatile keys recursively (the composite config nests the tower configs)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in _VOLATILE_KEYS}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def model_fingerprint(model: Any) -> str:
    """Content hash of a model's config and weights → ``"sha256:<16 hex digits>"`` (see module docstring)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "state_dict"):
        raise ValueError(
            f"expected a GranAlignModel (with .config and .state_dict()), got {type(model).__name__}"
        )
    digest = hashlib.sha256()
    config_json = json.dumps(_clean(config.to_dict()), sort_keys=True, default=str)
    digest.update(config_json.encode())
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def model_revision(model: Any) -> str | None:
    """The Hub commit the model was loaded from (`config._commit_hash`), or `None` (local weights)."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return str(commit) if commit else None


def describe_model(fingerprint: str, revision: str | None, name_or_path: str | None) -> str:
    """One readable line naming a model revision, e.g. ``sha256:ab12… (org/model @ 3f2e…)``."""
    where = name_or_path or "unnamed model"
    return f"{fingerprint} ({where}{f' @ {revision}' if revision else ''})"
