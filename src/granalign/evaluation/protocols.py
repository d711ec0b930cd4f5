"""Standard retrieval evaluation protocols (Flickr30K 1K, COCO 1K/5K) on a full test-set score matrix.

COCO 1K is the **mean over 5 folds** of 1,000 consecutive images of the 5K test set; each fold keeps
only its own images' captions (not the best fold, not a separate 1K file).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from granalign.evaluation.metrics import METRIC_KEYS, _as_scores, _as_text_to_image, retrieval_metrics

__all__ = [
    "PROTOCOLS",
    "ProtocolSpec",
    "evaluate_protocol",
    "evaluate_protocols",
    "fold_metrics",
    "format_metrics_table",
    "save_metrics_json",
]


@dataclass(frozen=True)
class ProtocolSpec:
    """An evaluation protocol: `num_folds` folds of consecutive images; `num_images` None = any count."""

    name: str
    num_folds: int
    num_images: int | None
    description: str


PROTOCOLS: dict[str, ProtocolSpec] = {
    spec.name: spec
    for spec in (
        ProtocolSpec("all", 1, None, "the whole score matrix as one pool (any dataset)"),
        ProtocolSpec("flickr30k-1k", 1, 1000, "Flickr30K Karpathy test split, 1,000 images"),
        ProtocolSpec("coco-5k", 1, 5000, "MS-COCO Karpathy 5K test split as one pool"),
        ProtocolSpec("coco-1k", 5, 5000, "MS-COCO 5K test split, mean over 5 folds of 1,000 images"),
    )
}


def fold_metrics(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    num_folds: int,
) -> dict[str, Any]:
    """Metrics on `num_folds` folds of consecutive images of `scores` `[N_img, N_txt]`, and their mean.

    Fold `k` holds images `[k*n, (k+1)*n)` with `n = N_img / num_folds` and only those images' captions
    (wherever their columns are). Returns `{"metrics": mean over folds (keys METRIC_KEYS), "folds": [per
    fold metrics], "num_folds", "num_images", "num_texts"}`; with one fold, `metrics` is the whole-set
    result.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
        raise ValueError(f"num_folds must be a positive int, got {num_folds!r}")
    num_folds = int(num_folds)
    s = _as_scores(scores)
    num_images, num_texts = s.shape
    t2i = _as_text_to_image(text_to_image, num_images, num_texts, s.device)
    if num_images % num_folds:
        raise ValueError(f"{num_images} images cannot be split into {num_folds} equal folds")
    fold_size = num_images // num_folds
    folds = []
    for k in range(num_folds):
        lo = k * fold_size
        columns = torch.nonzero((t2i >= lo) & (t2i < lo + fold_size)).flatten()
        block = s[lo : lo + fold_size] if num_folds == 1 else s[lo : lo + fold_size, columns]
        folds.append(retrieval_metrics(block, t2i[columns] - lo))
    mean = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    return {
        "metrics": mean,
        "folds": folds,
        "num_folds": num_folds,
        "num_images": num_images,
        "num_texts": num_texts,
    }


def _spec(protocol: str) -> ProtocolSpec:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def evaluate_protocol(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    protocol: str,
    *,
    check_size: bool = True,
) -> dict[str, Any]:
    """Evaluate the full test-set `scores` `[N_img, N_txt]` under `protocol` (a key of `PROTOCOLS`).

    Returns `fold_metrics(...)` plus `"protocol"`. With `check_size` the image count must be the
    protocol's (e.g. 5,000 for coco-1k); `check_size=False` only needs it to split into the folds
    (for smoke tests on subsets).
    """
    spec = _spec(protocol)
    s = _as_scores(scores)
    num_images = s.shape[0]
    if check_size and spec.num_images is not None and num_images != spec.num_images:
        raise ValueError(
            f"protocol {protocol!r} ({spec.description}) expects {spec.num_images} images, got "
            f"{num_images}; use protocol 'all' (or check_size=False) for other test sets"
        )
    if num_images % spec.num_folds:
        raise ValueError(
            f"protocol {protocol!r} needs an image count that is a multiple of its {spec.num_folds} folds, "
            f"got {num_images} images"
        )
    return {"protocol": protocol, **fold_metrics(s, text_to_image, spec.num_folds)}


def evaluate_protocols(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    protocols: Sequence[str],
    *,
    check_size: bool = True,
) -> dict[str, dict[str, Any]]:
    """`evaluate_protocol` for each name in `protocols` (e.g. `["coco-1k", "coco-5k"]`), keyed by name."""
    if isinstance(protocols, str):
        raise ValueError(f"protocols must be a sequence of names, got the string {protocols!r}")
    for name in protocols:
        _spec(name)
    return {name: evaluate_protocol(scores, text_to_image, name, check_size=check_size) for name in protocols}


_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("i2t R@1", "i2t_r1"),
    ("i2t R@5", "i2t_r5"),
    ("i2t R@10", "i2t_r10"),
    ("t2i R@1", "t2i_r1"),
    ("t2i R@5", "t2i_r5"),
    ("t2i R@10", "t2i_r10"),
    ("rSum", "rsum"),
)


def _table_rows(name: str, result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    if "metrics" not in result:  # a flat retrieval_metrics dict
        return [(name, result)]
    folds = result.get("folds", [])
    label = f"{name} (mean of {len(folds)} folds)" if len(folds) > 1 else name
    rows = [(label, result["metrics"])]
    if len(folds) > 1:
        rows += [(f"  fold {k}", fold) for k, fold in enumerate(folds)]
    if "identical_captions" in result:
        rows.append((f"{name}, identical captions correct", result["identical_captions"]))
    return rows


def format_metrics_table(results: Mapping[str, Any]) -> str:
    """A fixed-width table: one row per protocol (plus its folds), columns R@1/5/10 both ways and rSum.

    `results` is a `retrieval_metrics` dict, an `evaluate_protocol` result, or a mapping of names to
    either (e.g. the output of `evaluate_protocols`).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"results must be a non-empty mapping, got {results!r:.80}")
    if "rsum" in results:
        named: Mapping[str, Any] = {"all": results}
    elif "metrics" in results:
        named = {str(results.get("protocol", "all")): results}
    else:
        named = results
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for name, result in named.items():
        if not isinstance(result, Mapping) or ("metrics" not in result and "rsum" not in result):
            raise ValueError(
                f"results[{name!r}] is not a metrics dict or a protocol result (expected key 'rsum' or "
                f"'metrics'), got {result!r:.80}"
            )
        rows += _table_rows(str(name), result)
    label_width = max(len("protocol"), *(len(label) for label, _ in rows))
    widths = [max(len(header), 7) for header, _ in _TABLE_COLUMNS]
    header = "  ".join(
        ["protocol".ljust(label_width)]
        + [h.rjust(w) for (h, _), w in zip(_TABLE_COLUMNS, widths, strict=True)]
    )
    lines = [header, "-" * len(header)]
    for label, metrics in rows:
        cells = [
            f"{float(metrics[key]):.2f}".rjust(w) for (_, key), w in zip(_TABLE_COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join([label.ljust(label_width), *cells]))
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"cannot save a {type(value).__name__} as JSON")


def save_metrics_json(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `results` as indented JSON to `path` atomically (temp file in the same folder + os.replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, allow_nan=False, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
