"""Search a gallery: text → images or image → texts, top-k by the GRM score.

Two modes:

* ``"exhaustive"``: every query against every gallery item with the chunked kernel (`model.score`),
  gallery block by block, keeping a running top-k (memory: `Q · (k + gallery_chunk_size)` scores plus
  the kernel's chunk).
* ``"two-stage"``: a shortlist of `shortlist` items per query, re-ranked by the fine-grained score of
  those pairs only (`rerank.pair_scores`). The shortlist comes from the region level of GRM
  (``shortlist_by="regions"``, the default: K region tokens instead of L_v image tokens, ~`K / (L_v + K)`
  of the exhaustive cost) or from the global embeddings (``"embeddings"``: `get_image_features` /
  `get_text_features`, exact matmul or FAISS; sub-linear, but GRM does not train these embeddings, so
  they recall less). See `shortlist.py` and benchmarks/README.md.

`matrix.two_stage_scores` gives the evaluation protocol the same engine as a full score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput, select_rows
from granalign.retrieval.index import GalleryIndex
from granalign.retrieval.rerank import pair_scores
from granalign.retrieval.shortlist import (
    EmbeddingShortlist,
    check_shortlist_source,
    region_level_scores,
)

__all__ = [
    "DEFAULT_IMAGE_QUERY_SHORTLIST",
    "DEFAULT_SHORTLIST",
    "MODES",
    "SearchResult",
    "default_shortlist",
    "exhaustive_topk",
    "region_topk",
    "rerank_candidates",
    "search",
    "two_stage_topk",
]

MODES = ("two-stage", "exhaustive")
#: Shortlist sizes of the two-stage mode: for caption queries (text → image) and for image queries (image →
#: text, a gallery of ~5 captions per image, where the region level ranks candidates less faithfully).
#: Chosen in benchmarks/README.md for ≥ 10× the speed of exhaustive search with ≤ 1 point of R@1 lost.
DEFAULT_SHORTLIST = 20
DEFAULT_IMAGE_QUERY_SHORTLIST = 50

Outputs = GranAlignImageOutput | GranAlignTextOutput


@dataclass
class SearchResult:
    """Top-k of each query, best first: `scores`, `indices` `[Q, k]` (gallery rows) and their `ids`."""

    scores: torch.Tensor
    indices: torch.Tensor
    ids: list[list[str]]

    def to_records(self, index: GalleryIndex | None = None) -> list[list[dict[str, Any]]]:
        """Per query, a list of `{"rank", "id", "score"[, "text"]}` dicts (JSON-ready)."""
        records = []
        for query_scores, query_rows, query_ids in zip(self.scores, self.indices, self.ids, strict=True):
            hits = []
            for rank, (score, row, item) in enumerate(
                zip(query_scores, query_rows, query_ids, strict=True), 1
            ):
                hit = {"rank": rank, "id": item, "score": float(score)}
                if index is not None and index.texts is not None:
                    hit["text"] = index.texts[int(row)]
                hits.append(hit)
            records.append(hits)
        return records


def _check_roles(gallery: Outputs, queries: Outputs) -> None:
    if isinstance(gallery, GranAlignImageOutput) and isinstance(queries, GranAlignTextOutput):
        return
    if isinstance(gallery, GranAlignTextOutput) and isinstance(queries, GranAlignImageOutput):
        return
    raise ValueError(
        "text queries search a gallery of images and image queries a gallery of texts; got "
        f"{type(queries).__name__} queries against a {type(gallery).__name__} gallery"
    )


def _streaming_topk(
    score_block: Any,
    gallery: Outputs,
    queries: Outputs,
    k: int,
    gallery_chunk_size: int,
    device: Any,
    progress: bool = False,
    description: str = "score gallery",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over gallery blocks; `score_block(block, queries)` → `[Q, G]` scores."""
    if k < 1 or gallery_chunk_size < 1:
        raise ValueError(f"k and gallery_chunk_size must be >= 1, got {k} and {gallery_chunk_size}")
    num_items, num_queries = gallery.tokens.shape[0], queries.tokens.shape[0]
    queries = select_rows(queries, slice(0, num_queries), device)
    best_scores = torch.empty((num_queries, 0))
    best_rows = torch.empty((num_queries, 0), dtype=torch.long)
    for start in tqdm(range(0, num_items, gallery_chunk_size), desc=description, disable=not progress):
        block = select_rows(gallery, slice(start, start + gallery_chunk_size), device)
        scores = torch.cat([best_scores, score_block(block, queries).float().cpu()], dim=1)
        rows = torch.cat(
            [best_rows, torch.arange(start, start + block.tokens.shape[0]).expand(num_queries, -1)], dim=1
        )
        best_scores, position = scores.topk(min(k, scores.shape[1]), dim=1)
        best_rows = rows.gather(1, position)
    return best_scores, best_rows


@torch.no_grad()
def exhaustive_topk(
    model: Any,
    gallery: Outputs,
    queries: Outputs,
    k: int = 10,
    gallery_chunk_size: int = 1024,
    image_chunk_size: int = 16,
    text_chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by the full GRM score (`model.score`): scores, gallery rows `[Q, min(k, N)]` (CPU)."""
    _check_roles(gallery, queries)
    chunks = dict(image_chunk_size=image_chunk_size, text_chunk_size=text_chunk_size, dtype=dtype)

    def score_block(block: Outputs, query: Outputs) -> torch.Tensor:
        if isinstance(block, GranAlignImageOutput):
            return model.score(block, query, **chunks).t()
        return model.score(query, block, **chunks)

    device = torch.device(device) if device is not None else queries.tokens.device
    return _streaming_topk(score_block, gallery, queries, k, gallery_chunk_size, device, progress)


@torch.no_grad()
def region_topk(
    model: Any,
    gallery: Outputs,
    queries: Outputs,
    k: int,
    gallery_chunk_size: int = 4096,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by the region level `S_unc` only (the default first stage): scores, rows `[Q, min(k, N)]`."""
    _check_roles(gallery, queries)
    check_shortlist_source("regions", _images(gallery, queries))
    config = getattr(model, "config", model)
    similarity = dict(negative_slope=config.similarity_negative_slope, pooling=config.similarity_pooling)

    def score_block(block: Outputs, query: Outputs) -> torch.Tensor:
        if isinstance(block, GranAlignImageOutput):
            return region_level_scores(block, query, dtype=dtype, **similarity).t()
        return region_level_scores(query, block, dtype=dtype, **similarity)

    device = torch.device(device) if device is not None else queries.tokens.device
    return _streaming_topk(score_block, gallery, queries, k, gallery_chunk_size, device)


def _rerank(
    model: Any,
    gallery: Outputs,
    queries: Outputs,
    query_rows: torch.Tensor,
    item_rows: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """Fine scores of the pairs (query `query_rows[p]`, gallery item `item_rows[p]`) → `[P]` (CPU)."""
    if isinstance(gallery, GranAlignImageOutput):
        return pair_scores(model, gallery, queries, item_rows, query_rows, **kwargs).cpu()
    return pair_scores(model, queries, gallery, query_rows, item_rows, **kwargs).cpu()


def _images(gallery: Outputs, queries: Outputs) -> GranAlignImageOutput:
    return gallery if isinstance(gallery, GranAlignImageOutput) else queries


def _embeds(outputs: Outputs) -> torch.Tensor:
    return outputs.image_embeds if isinstance(outputs, GranAlignImageOutput) else outputs.text_embeds


def default_shortlist(queries: Outputs) -> int:
    """The default two-stage shortlist for `queries`: `DEFAULT_IMAGE_QUERY_SHORTLIST` for images, else
    `DEFAULT_SHORTLIST`."""
    return DEFAULT_IMAGE_QUERY_SHORTLIST if isinstance(queries, GranAlignImageOutput) else DEFAULT_SHORTLIST


@torch.no_grad()
def two_stage_topk(
    model: Any,
    gallery: Outputs,
    queries: Outputs,
    k: int = 10,
    shortlist: int | None = None,
    shortlist_by: str = "regions",
    backend: str = "auto",
    shortlister: EmbeddingShortlist | None = None,
    pair_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k among each query's `shortlist` best items by the first stage, re-ranked by the GRM score.

    Args:
        shortlist: candidates per query (default: `default_shortlist(queries)`).
        shortlist_by: ``"regions"`` (region level `S_unc`, exhaustive but cheap) or ``"embeddings"``
            (global embeddings through `backend`: "auto", "matmul" or "faiss"; `shortlister` reuses a
            built `EmbeddingShortlist`).

    Returns scores and gallery rows `[Q, min(k, N)]` (CPU).
    """
    _check_roles(gallery, queries)
    check_shortlist_source(shortlist_by, _images(gallery, queries))
    shortlist = default_shortlist(queries) if shortlist is None else shortlist
    if k < 1 or shortlist < 1:
        raise ValueError(f"k and shortlist must be >= 1, got {k} and {shortlist}")
    num_items = gallery.tokens.shape[0]
    size = min(max(shortlist, k), num_items)
    if shortlist_by == "regions":
        _, candidates = region_topk(model, gallery, queries, size, dtype=dtype, device=device)
    else:
        shortlister = shortlister if shortlister is not None else EmbeddingShortlist(_embeds(gallery))
        _, candidates = shortlister.topk(_embeds(queries), size, backend)  # [Q, size], -1 = not found
    return rerank_candidates(
        model, gallery, queries, candidates, k, pair_chunk_size=pair_chunk_size, dtype=dtype, device=device
    )


@torch.no_grad()
def rerank_candidates(
    model: Any,
    gallery: Outputs,
    queries: Outputs,
    candidates: torch.Tensor,
    k: int,
    pair_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second stage: each query's `candidates` `[Q, C]` (gallery rows, -1 = none) re-ranked by the
    GRM score → scores and gallery rows `[Q, min(k, C)]` (CPU; -inf / -1 where a query had fewer)."""
    _check_roles(gallery, queries)
    num_queries = queries.tokens.shape[0]
    found = candidates >= 0
    query_rows = torch.arange(num_queries).repeat_interleave(candidates.shape[1])[found.flatten()]
    fine = _rerank(
        model, gallery, queries, query_rows, candidates[found],
        pair_chunk_size=pair_chunk_size, dtype=dtype, device=device,
    )  # fmt: skip
    scores = torch.full(candidates.shape, -torch.inf)
    scores[found] = fine
    best_scores, position = scores.topk(min(k, candidates.shape[1]), dim=1)
    rows = candidates.gather(1, position)
    return best_scores, rows.masked_fill(best_scores == -torch.inf, -1)


def search(
    model: Any,
    index: GalleryIndex,
    queries: Outputs,
    k: int = 10,
    mode: str = "two-stage",
    shortlist: int | None = None,
    shortlist_by: str = "regions",
    backend: str = "auto",
    faiss_factory: str = "Flat",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    check_model: bool = True,
) -> SearchResult:
    """Search `index` with encoded `queries` (captions for an image index, images for a text index).

    `model` must be the model that built the index (checked by fingerprint when it is a model and
    `check_model`, which hashes every weight: a caller that checked once, e.g. a server answering many
    queries, passes `check_model=False`; a bare config skips the check). `mode`: ``"two-stage"``
    (default) or ``"exhaustive"``; see `two_stage_topk` for `shortlist`, `shortlist_by` and `backend`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; expected one of {MODES}")
    if len(index) == 0:
        raise ValueError("the index is empty")
    if check_model and hasattr(model, "state_dict"):
        index.check_model(model)
    if mode == "exhaustive":
        scores, rows = exhaustive_topk(
            model, index.outputs, queries, k, dtype=dtype, device=device, progress=progress
        )
    else:
        shortlister = index.shortlister(faiss_factory) if shortlist_by == "embeddings" else None
        scores, rows = two_stage_topk(
            model, index.outputs, queries, k, shortlist, shortlist_by, backend, shortlister,
            dtype=dtype, device=device,
        )  # fmt: skip
    ids = [[index.ids[int(row)] for row in query_rows] for query_rows in rows]
    return SearchResult(scores=scores, indices=rows, ids=ids)
