"""First stage of a two-stage search: a cheap score that picks the candidates the GRM score re-ranks.

Two first stages (`SHORTLIST_SOURCES`):

* ``"regions"``: the region level of GRM, `S_unc = sim(T̂, U)`, caption tokens against each image's K
  region tokens, for every pair (`region_level_scores`). It is one of the three levels the model is
  trained on and costs about `K / (L_v + K)` of the full score (2.5 % for ViT-B/16 with K = 5). A
  model without region prompting has no region level: this first stage refuses its images.
* ``"embeddings"``: inner product of the global embeddings (`get_image_features` / `get_text_features`,
  unit vectors) — `EmbeddingShortlist`, sub-linear with FAISS. GRM's loss does not train these
  embeddings (they are means of the tokens), so their shortlists recall less (benchmarks/README.md).

Two backends for the embeddings, both maximum inner product (= cosine on unit vectors):

* ``"matmul"``: exact; the query block is multiplied with the gallery in chunks of `gallery_chunk_size`
  rows and a running top-k is kept, so memory is `Q · (k + gallery_chunk_size)` scores.
* ``"faiss"``: a FAISS index built through `datasets` (`Dataset.add_faiss_index_from_external_arrays`),
  for large galleries. The default factory ``"Flat"`` is exact; an approximate one (e.g. ``"HNSW32"``)
  trades recall for speed. Needs the `retrieval` extra (`pip install granalign[retrieval]`).

``"auto"`` picks FAISS when it is installed and the gallery has at least `FAISS_MIN_ITEMS` items.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from granalign.scoring_granalign import chunked_region_similarities, code_regions, code_texts

__all__ = [
    "BACKENDS",
    "FAISS_MIN_ITEMS",
    "SHORTLIST_SOURCES",
    "EmbeddingShortlist",
    "check_shortlist_source",
    "exact_topk",
    "faiss_available",
    "region_level_scores",
]

SHORTLIST_SOURCES = ("regions", "embeddings")

BACKENDS = ("auto", "matmul", "faiss")
#: Gallery size from which ``backend="auto"`` uses FAISS (when installed).
FAISS_MIN_ITEMS = 100_000
_INDEX_NAME = "embeds"


def check_shortlist_source(shortlist_by: str, image_outputs: Any = None) -> None:
    """Raise `ValueError` unless `shortlist_by` is one of `SHORTLIST_SOURCES` and, given the image side,
    the images have what it needs (region tokens for ``"regions"``)."""
    if shortlist_by not in SHORTLIST_SOURCES:
        raise ValueError(f"unknown shortlist source {shortlist_by!r}; expected one of {SHORTLIST_SOURCES}")
    if shortlist_by == "regions" and image_outputs is not None:
        _require_regions(image_outputs)


def _require_regions(image_outputs: Any) -> None:
    if getattr(image_outputs, "region_tokens", None) is None:
        raise ValueError(
            "the 'regions' first stage ranks by the region level, but these images have no region tokens "
            "(a model with use_region_prompting=False): use shortlist_by='embeddings' "
            "(--shortlist-by embeddings) or the exhaustive mode"
        )


def faiss_available() -> bool:
    """Whether the `faiss` module can be imported."""
    return importlib.util.find_spec("faiss") is not None


def exact_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, gallery_chunk_size: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k: queries `[Q, d]`, gallery `[N, d]` → scores, indices `[Q, min(k, N)]`."""
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"need [Q, d] queries and [N, d] gallery, got {list(queries.shape)} and {list(gallery.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, gallery.shape[0])
    queries = queries.float()
    best_scores = queries.new_empty((queries.shape[0], 0))
    best_index = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, gallery.shape[0], gallery_chunk_size):
        block = gallery[start : start + gallery_chunk_size].to(queries.device, torch.float32)
        scores = torch.cat([best_scores, queries @ block.t()], dim=1)
        index = torch.cat(
            [
                best_index,
                torch.arange(start, start + block.shape[0], device=queries.device).expand(
                    queries.shape[0], -1
                ),
            ],
            dim=1,
        )
        best_scores, position = scores.topk(min(k, scores.shape[1]), dim=1)
        best_index = index.gather(1, position)
    return best_scores, best_index


@torch.no_grad()
def region_level_scores(
    image_outputs: Any,
    text_outputs: Any,
    negative_slope: float = 0.1,
    image_chunk_size: int = 64,
    text_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    pooling: str = "token_max",
) -> torch.Tensor:
    """The region (uncertainty) level `[N_img, N_txt]` of every pair; equals `model.level_scores(...)[2]`
    (pass the model's `similarity_negative_slope` and `similarity_pooling`).

    Uses only `region_tokens` `[N_img, K, d]` of the images and the caption tokens
    (`scoring_granalign.chunked_region_similarities`); memory is `image_chunk_size · K · text_chunk_size
    · L_t` cosines. Images without region tokens are refused.
    """
    _require_regions(image_outputs)
    images = code_regions(image_outputs.region_tokens, dtype)
    texts = code_texts(text_outputs.tokens, text_outputs.token_mask, text_outputs.keep_weights, dtype)
    return chunked_region_similarities(
        images, texts, negative_slope, pooling, image_chunk_size, text_chunk_size
    )


class EmbeddingShortlist:
    """Top-k over a fixed gallery of unit embeddings `[N, d]`; builds its FAISS index once, on first use."""

    def __init__(self, embeddings: torch.Tensor, faiss_factory: str = "Flat") -> None:
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"need a non-empty [N, d] gallery of embeddings, got {list(embeddings.shape)}")
        self.embeddings = embeddings
        self.faiss_factory = faiss_factory
        self._dataset = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def resolve_backend(self, backend: str) -> str:
        """``"auto"`` → ``"faiss"`` or ``"matmul"``; ``"faiss"`` without faiss installed is an error."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown shortlist backend {backend!r}; expected one of {BACKENDS}")
        if backend == "auto":
            return "faiss" if faiss_available() and len(self) >= FAISS_MIN_ITEMS else "matmul"
        if backend == "faiss" and not faiss_available():
            raise ValueError("shortlist backend 'faiss' needs faiss: pip install 'granalign[retrieval]'")
        return backend

    def _faiss_dataset(self):
        if self._dataset is None:
            import faiss
            from datasets import Dataset

            vectors = np.ascontiguousarray(self.embeddings.detach().to("cpu", torch.float32).numpy())
            dataset = Dataset.from_dict({"row": np.arange(len(self), dtype=np.int64)})
            train_size = None if self.faiss_factory == "Flat" else len(self)
            try:
                dataset.add_faiss_index_from_external_arrays(
                    vectors,
                    index_name=_INDEX_NAME,
                    string_factory=self.faiss_factory,
                    metric_type=faiss.METRIC_INNER_PRODUCT,
                    train_size=train_size,
                )
            except RuntimeError as error:  # faiss reports a bad factory string from deep in C++
                reason = str(error).rpartition(": ")[2].strip()
                raise ValueError(
                    f"FAISS could not build index {self.faiss_factory!r} over {len(self)} items ({reason}); "
                    "expected a faiss index_factory string such as 'Flat', 'HNSW32' or 'IVF64,Flat'"
                ) from None
            self._dataset = dataset
        return self._dataset

    def topk(self, queries: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and gallery rows `[Q, min(k, N)]` of the best `k` items for each query `[Q, d]` (CPU).

        An approximate FAISS index may find fewer than `k` items: the missing rows are -1 (score -inf).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        if self.resolve_backend(backend) == "matmul":
            scores, index = exact_topk(queries.detach().cpu(), self.embeddings, k)
            return scores, index
        vectors = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        result = self._faiss_dataset().search_batch(_INDEX_NAME, vectors, k=k)
        scores = torch.from_numpy(np.stack(result.total_scores).astype(np.float32))
        index = torch.from_numpy(np.stack(result.total_indices).astype(np.int64))
        # an approximate index may return fewer than k hits: those rows are -1, with score -inf
        scores = scores.masked_fill(index < 0, -torch.inf)
        return scores, index
