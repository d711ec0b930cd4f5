"""Retrieval evaluation on precomputed image-text score matrices: metrics, protocols, reports."""

from __future__ import annotations

from pathlib import Path

from granalign.evaluation.metrics import (
    METRIC_KEYS,
    RECALL_KEYS,
    RECALL_KS,
    retrieval_metrics,
    retrieval_ranks,
    text_to_image_from_caption_ids,
)
from granalign.evaluation.protocols import (
    PROTOCOLS,
    ProtocolSpec,
    evaluate_protocol,
    evaluate_protocols,
    fold_metrics,
    format_metrics_table,
    save_metrics_json,
)

#: Directory of the `evaluate` metric module: `evaluate.load(RETRIEVAL_METRIC_PATH)`.
RETRIEVAL_METRIC_PATH: str = str(Path(__file__).resolve().parent / "retrieval_recall")

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "RECALL_KEYS",
    "RECALL_KS",
    "RETRIEVAL_METRIC_PATH",
    "ProtocolSpec",
    "evaluate_protocol",
    "evaluate_protocols",
    "fold_metrics",
    "format_metrics_table",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_metrics_json",
    "text_to_image_from_caption_ids",
]
