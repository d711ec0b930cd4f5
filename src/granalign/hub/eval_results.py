"""Read retrieval evaluation JSON (as `granalign evaluate --output-json` and training write it) into
per-dataset, per-protocol results for a model card's `model-index`.

Accepted JSON shapes: an `evaluate_protocol` result (`{"protocol", "metrics", "folds", ...}`), a mapping
of protocol names to such results (`evaluate_protocols`), a flat `retrieval_metrics` dict (protocol
"all"), a training summary (`final/metrics.json`, whose `"test"` entry is used) or a dev-metrics file
(`best/dev_metrics.json`, flat metrics with a `"split"`). Optional top-level `"dataset"` and `"split"`
keys name the dataset and split; otherwise the protocol implies the dataset (flickr30k-1k, coco-1k/5k),
or a default (the training recipe's data source) is used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

__all__ = [
    "KNOWN_DATASETS",
    "METRIC_NAMES",
    "DatasetRef",
    "EvalSource",
    "RetrievalResult",
    "load_eval_results",
    "parse_eval_spec",
    "resolve_dataset",
    "to_eval_results",
]

TASK_TYPE, TASK_NAME = "image-text-retrieval", "Image-Text Retrieval"

# the keys reported in the model-index (percentages), in order, with their display names
METRIC_NAMES: dict[str, str] = {
    "i2t_r1": "Image-to-text R@1",
    "i2t_r5": "Image-to-text R@5",
    "i2t_r10": "Image-to-text R@10",
    "t2i_r1": "Text-to-image R@1",
    "t2i_r5": "Text-to-image R@5",
    "t2i_r10": "Text-to-image R@10",
    "rsum": "rSum",
}


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as the card names it: `type` (a Hub dataset id where one exists) and a display name."""

    type: str
    name: str
    on_hub: bool = True


KNOWN_DATASETS: dict[str, DatasetRef] = {
    "flickr30k": DatasetRef("nlphuji/flickr30k", "Flickr30K (Karpathy split)"),
    "coco": DatasetRef("yerevann/coco-karpathy", "MS-COCO (Karpathy split)"),
    "builtin": DatasetRef("granalign-synthetic-scenes", "granalign built-in synthetic scenes", on_hub=False),
}
_ALIASES = {
    "f30k": "flickr30k",
    "nlphuji/flickr30k": "flickr30k",
    "mscoco": "coco",
    "coco-karpathy": "coco",
    "yerevann/coco-karpathy": "coco",
    "synthetic": "builtin",
    "granalign-synthetic-scenes": "builtin",
}
_PROTOCOL_DATASETS = {"flickr30k-1k": "flickr30k", "coco-1k": "coco", "coco-5k": "coco"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_FILE = re.compile(r"\.(json|jsonl|csv|tsv|parquet|arrow|txt|zip|tar|gz)$", re.IGNORECASE)
_KARPATHY_FILE = re.compile(r"(?:^|[/\\])dataset_(coco|flickr30k)\.json$", re.IGNORECASE)


def resolve_dataset(name: str) -> DatasetRef:
    """A known short name (`flickr30k`, `coco`, `builtin`), a Hub dataset id, a Karpathy split file
    (`.../dataset_coco.json`, `.../dataset_flickr30k.json`), or any other label."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a dataset name must be a non-empty string, got {name!r}")
    karpathy = _KARPATHY_FILE.search(name.strip())
    key = karpathy.group(1).lower() if karpathy else name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in KNOWN_DATASETS:
        return KNOWN_DATASETS[key]
    text = name.strip()
    local = Path(text).expanduser().exists() or bool(_DATA_FILE.search(text))
    return DatasetRef(text, text, on_hub=bool(_HUB_ID.match(text)) and not local)


@dataclass(frozen=True)
class EvalSource:
    """Evaluation JSON (a path or the loaded mapping) and, optionally, the dataset and split it is on."""

    results: str | os.PathLike[str] | Mapping[str, Any]
    dataset: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class RetrievalResult:
    """R@1/5/10 both ways and rSum (percent) of one protocol on one dataset split."""

    dataset: DatasetRef
    split: str
    protocol: str
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def parse_eval_spec(spec: str) -> EvalSource:
    """Parse a CLI value `FILE` or `DATASET=FILE` (e.g. `nlphuji/flickr30k=metrics.json`)."""
    dataset, sep, path = spec.partition("=")
    if not sep:
        dataset, path = "", spec
    if not path.strip():
        raise ValueError(f"--eval-json {spec!r}: expected FILE or DATASET=FILE")
    return EvalSource(path.strip(), dataset.strip() or None)


def _load(source: EvalSource) -> tuple[Mapping[str, Any], str]:
    if isinstance(source.results, Mapping):
        return source.results, "the evaluation results"
    path = Path(source.results)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation JSON {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"evaluation JSON {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"evaluation JSON {str(path)!r} must hold an object, got {type(data).__name__}")
    return data, repr(str(path))


def _metrics(values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a metrics mapping, got {values!r:.80}")
    missing = [key for key in METRIC_NAMES if key not in values]
    if missing:
        raise ValueError(f"{where}: metrics lack {missing} (have {sorted(values)})")
    out = {}
    for key in METRIC_NAMES:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{where}: metric {key!r} must be a number, got {value!r}")
        out[key] = round(float(value), 2)
    return out


def _protocol_results(data: Mapping[str, Any], where: str) -> list[tuple[str, Mapping[str, Any]]]:
    """`(protocol, result)` pairs from any accepted shape."""
    if "test" in data and ("dev_history" in data or "best_dev_rsum" in data):  # a training summary
        if data["test"] is None:
            return []
        return _protocol_results(data["test"], f"{where} (its 'test' entry)")
    if "rsum" in data:
        return [(str(data.get("protocol", "all")), data)]
    if "metrics" in data:
        return [(str(data.get("protocol", "all")), data)]
    pairs = [
        (str(k), v) for k, v in data.items() if isinstance(v, Mapping) and ("metrics" in v or "rsum" in v)
    ]
    if not pairs:
        raise ValueError(
            f"{where} is not an evaluation result: expected 'metrics' (evaluate_protocol), 'rsum' "
            f"(retrieval_metrics), a mapping of protocol names to those, or a training summary; "
            f"got keys {sorted(data)[:10]}"
        )
    return pairs


def load_eval_results(
    sources: EvalSource | Sequence[EvalSource] | str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    default_dataset: str | None = None,
) -> list[RetrievalResult]:
    """Parse evaluation JSON into `RetrievalResult`s; `default_dataset` names the dataset of results
    whose source, JSON and protocol do not (e.g. the training recipe's `data.source`)."""
    if sources is None:
        return []
    if isinstance(sources, (EvalSource, str, os.PathLike, Mapping)):
        sources = [sources]  # type: ignore[list-item]
    results: list[RetrievalResult] = []
    for source in sources:
        if not isinstance(source, EvalSource):
            source = EvalSource(source)
        data, where = _load(source)
        for protocol, result in _protocol_results(data, where):
            metrics = _metrics(result.get("metrics", result), where)
            name = (
                source.dataset or data.get("dataset") or _PROTOCOL_DATASETS.get(protocol) or default_dataset
            )
            if not name:
                raise ValueError(
                    f"cannot tell which dataset {where} (protocol {protocol!r}) was evaluated on: name it, "
                    "e.g. --eval-json DATASET=FILE or EvalSource(path, dataset='nlphuji/flickr30k')"
                )
            split = source.split or data.get("split") or result.get("split") or "test"
            extra = {k: result[k] for k in ("num_images", "num_texts", "num_folds") if k in result}
            results.append(RetrievalResult(resolve_dataset(str(name)), str(split), protocol, metrics, extra))
    return results


def to_eval_results(results: Sequence[RetrievalResult]) -> list[EvalResult]:
    """One `huggingface_hub.EvalResult` per metric; the protocol is the dataset config, so COCO 1K and 5K
    are separate `model-index` entries."""
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=r.dataset.type,
            dataset_name=r.dataset.name,
            dataset_config=r.protocol,
            dataset_split=r.split,
            metric_type=key,
            metric_name=name,
            metric_value=r.metrics[key],
        )
        for r in results
        for key, name in METRIC_NAMES.items()
    ]
