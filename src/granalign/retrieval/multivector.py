"""A multi-vector first stage (FAISS over image token vectors), with a compact on-disk re-rank store.

`TokenIndex` is a directory holding two things for an image gallery:

* **a FAISS index of first-stage token vectors** (PLAID / ColBERT style): for every image its
  `first_stage_tokens` tokens of highest keep probability (the significance adapter's choice; all real
  tokens when `None`), unit-normalised, each stored with its image row as FAISS id. A caption query
  searches the `token_k` nearest image tokens of each of its tokens (or of its `query_tokens` tokens of
  highest keep weight); the images they belong to are the candidates, ranked by an approximate text-side late interaction (`aggregate_token_hits`): for each
  caption token `i` the best retrieved cosine of the image, or the lowest cosine retrieved for that token
  when the image was not retrieved (missing-similarity imputation, as XTR / ColBERTv2 do), LeakyReLU'd
  and averaged with weights `w_o + w_k · a_i` (the original and key levels' caption-side weights). With
  an exact FAISS index and `token_k` covering every stored token this is exactly the text-side term of
  those levels over the first-stage tokens (`tests/test_multivector.py`).
* **a re-rank store** (`TokenStore`): per image its re-rank tokens (all real tokens, or the
  `rerank_tokens` of highest keep probability), their keep weights, its region tokens and its global
  embedding, in flat append-only files read through `numpy.memmap`. Tokens and regions are stored as
  ``float32``, ``float16`` or ``int8`` (symmetric, one scale per vector, which is dropped: the kernel
  unit-normalises every token, so the int8 codes are decoded as-is).

`token_k` must cover the image tokens a caption token's concept has in the gallery: it grows with the
number of images sharing a concept (benchmarks/README.md, `bench_search_scale.py`: 256 suffices at 10k
synthetic images, 4,096 at 100k).

**Centroid first stage** (`mode="centroids"`, PLAID: Santhanam et al. 2022), for IVF first stages: every
first-stage token's IVF coarse centroid is stored (`centroids.bin`, one id per token, in image order) with
the inverted lists centroid → image rows derived from it (`centroid_lists.bin`, rebuilt by `save`). A
query scores its tokens against all centroids (one `[T, nlist]` matmul, cosines), and

1. *candidate generation*: each query token probes its `nprobe` best centroids; the images in those
   centroids' lists are the candidates, scored as the token hits are (`aggregate_token_hits`): per query
   token the best probed centroid the image holds, else the token's lowest probed score (the pruned
   centroid interaction); the best `ndocs` go on;
2. *centroid interaction* (`centroid_interaction`): per query token the max over **all** the candidate's
   token centroids, LeakyReLU'd, weighted as above; the best `refine` (or `candidates`) go on;
3. optional *refinement* (`refine > 0`): the exact caption-side interaction over the candidates'
   first-stage tokens, decoded from their compact codes (`first_stage_codes.bin`, the store's codec:
   PLAID's decompression step); the best `candidates` go to the re-rank. Centroid interaction ties
   whenever images hold the same centroids (on the synthetic benchmark ~80 images tie for first at
   100k), so refinement is what orders them before the re-rank.

Its cost grows with the probed lists (about `T · nprobe · N · tokens per image / nlist` rows), not with a
`token_k` that must cover every image sharing a concept.

**The coarse quantizer** (`create(centroids=...)`, `resolve_centroids`): "ivf", the IVF factory's own
quantizer (`nlist` fixed by the factory: lists grow linearly with N), or "IMI2x<b>", a FAISS inverted
multi-index (`MultiIndexQuantizer`: two half-codebooks of 2^b centroids, 4^b cells; `centroid_quantizer.faiss`)
trained on the same sample. Its cells are assigned by FAISS's rule (nearest half-centroid in each half: two
small BLAS matmuls, cheaper than 1,024 flat centroids at 65,536 cells); a query token's cell scores come from
its two `[2^b]` half-scores: the `nprobe` nearest cells from the `nprobe²` pairs of each half's best, and
the cosines of the probed cells and of the candidates' cells only (no `[T, 4^b]` table). "auto" (the
default) picks PLAID's cell count for `expected_items` (`plaid_nlist`: `2^floor(log2(16 √(N · tokens)))`,
65,536 at 1M × 32 tokens) when it exceeds the IVF's `nlist`, and "ivf" without `expected_items` (the
behaviour of indices built before the option; their meta has no `centroid_quantizer` and reads as "ivf").
`assign_centroids` switches a saved index between the two (from its first-stage codes, or the FAISS lists).

The top `candidates` images of the first stage are re-ranked by the exact GRM score
(`rerank.pair_scores`, the one scoring kernel) on the stored tokens. With ``float32`` storage of every
token and exhaustive first-stage parameters the result is the exhaustive ranking.

Building streams (`add` / `add_chunks` append chunks: tokens go straight to disk, only the FAISS training
sample is buffered), indices are appendable (`TokenIndex.open(path).add(...)`) and can be built in shards,
one per process, and merged (`train_first_stage`, `merge_token_indices`, `build_token_index_distributed`).
Needs faiss (the `retrieval` extra); the rest of `granalign.retrieval` works without it.

Layout of the directory:

| file | content |
|---|---|
| `meta.json` | format, version, model fingerprint/revision/name, dims, codec, settings, counts |
| `ids.txt` | one item id per line, in row order |
| `tokens.bin`, `keep.bin`, `lengths.bin` | re-rank tokens `[T, d]` (codec), keep weights `[T]` (fp16), tokens per image `[N]` (int32) |
| `regions.bin`, `embeds.bin` | region tokens `[N, K, d]` (codec, absent without regions), global embeddings `[N, d]` (fp16) |
| `first_stage.faiss` | the FAISS index of first-stage token vectors, ids = image rows |
| `centroids.bin`, `centroid_counts.bin` | IVF centroid of each first-stage token `[T_fs]` (uint16 / int32), first-stage tokens per image `[N]` (int32) |
| `centroid_lists.bin`, `centroid_offsets.bin` | derived: image rows of each centroid, unique and ascending `[E]` (int32), CSR offsets `[nlist + 1]` (int64) |
| `first_stage_codes.bin` | the first-stage tokens `[T_fs, d]` (codec), for `refine` (absent with `first_stage_codes=False`) |
| `centroid_quantizer.faiss` | the multi-index of an "IMI2x<b>" centroid first stage (absent with "ivf") |
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput
from granalign.retrieval.fingerprint import describe_model, model_fingerprint, model_revision

__all__ = [
    "CODECS",
    "FIRST_STAGE_MODES",
    "TOKEN_INDEX_FORMAT",
    "TokenIndex",
    "TokenStore",
    "aggregate_token_hits",
    "build_token_index_distributed",
    "centroid_interaction",
    "first_stage_query_tokens",
    "merge_token_indices",
    "select_tokens",
    "shard_range",
]

TOKEN_INDEX_FORMAT = "granalign-token-index"
TOKEN_INDEX_VERSION = 1
CODECS = ("float32", "float16", "int8")
_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
_FAISS_FILE = "first_stage.faiss"
_TRAINED_FILE = "trained.faiss"
FIRST_STAGE_MODES = ("tokens", "centroids")
DEFAULT_REFINE = 64  # centroid-interaction candidates refined on their first-stage codes (measured)
_CENTROID_FILES = ("centroids.bin", "centroid_counts.bin")
_LIST_FILES = ("centroid_lists.bin", "centroid_offsets.bin")
_FS_CODES_FILE = "first_stage_codes.bin"
_QUANTIZER_FILE = "centroid_quantizer.faiss"
#: the coarse quantizers of the centroid first stage (`TokenIndex.create(centroids=...)`): the IVF index's own
#: quantizer, or a FAISS inverted multi-index of `2^b × 2^b` cells ("IMI2x<b>", b in 1..8: uint16 ids)
CENTROID_QUANTIZERS = ("auto", "ivf", "IMI2x<b>")
_AUTO_TOKENS = 32  # first-stage tokens per image assumed by centroids="auto" when first_stage_tokens is None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is in the retrieval extra
        raise ImportError(
            "the multi-vector token index needs faiss: pip install 'granalign[retrieval]'"
        ) from None
    return faiss


def _ivf(index: Any) -> Any:
    """The IVF index inside `index` (through pre-transforms), or None for flat and graph indices."""
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _top_level_ivf(index: Any) -> Any:
    """`index` as an IVF index when it is one itself (no pre-transform: its quantizer sees the vectors)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return None
    return index if isinstance(index, faiss.IndexIVF) else None


def plaid_nlist(num_embeddings: int) -> int:
    """PLAID's centroid count for a collection of `num_embeddings` token vectors:
    `2^floor(log2(16 · sqrt(num_embeddings)))` (Santhanam et al. 2022; 65,536 at 32M tokens)."""
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    return 2 ** int(np.floor(np.log2(16 * np.sqrt(num_embeddings))))


#: the smallest multi-index "auto" puts in place of an IVF quantizer (resolve_centroids)
_AUTO_MIN_IMI_BITS = 8


def _imi_bits(spec: str) -> int | None:
    """b of an "IMI2x<b>" spec (None for anything else)."""
    if not spec.startswith("IMI2x") or not spec[5:].isdigit():
        return None
    return int(spec[5:])


def resolve_centroids(
    centroids: str, expected_items: int | None, first_stage_tokens: int | None, ivf_nlist: int | None
) -> str | None:
    """The coarse quantizer a `TokenIndex.create(centroids=...)` call uses: "ivf", "IMI2x<b>" or None (no
    centroid first stage: a non-IVF factory with "auto").

    "auto": without `expected_items`, the IVF quantizer (as before this option existed); with it, the
    inverted multi-index closest below PLAID's `plaid_nlist(expected_items · first_stage_tokens)` cells
    (`IMI2x<b>`, `4^b` cells, b <= 8) where that is IMI2x8 (65,536 cells, from ~524k images at 32 tokens)
    and has more cells than the IVF's `ivf_nlist`, else the IVF. With an IVF factory a smaller multi-index
    is never chosen: measured against IVF1024 (benchmarks/README.md), IMI2x7 lost the target from the
    shortlist for 7 % of queries at 100k (IVF: 1 %) and 3.3 R@1, and was no faster there; IMI2x8 kept
    IVF1024's recall at 20k and cut the first stage's CPU 3x at 1M. Without an IVF factory (nothing else
    to use), PLAID's multi-index of any size.
    """
    if centroids == "auto":
        if expected_items is not None and expected_items < 1:
            raise ValueError(f"expected_items must be >= 1 or None, got {expected_items}")
        if expected_items is None:
            return "ivf" if ivf_nlist is not None else None
        tokens = expected_items * (first_stage_tokens or _AUTO_TOKENS)
        bits = min(8, int(np.log2(plaid_nlist(tokens))) // 2)
        if ivf_nlist is not None and (bits < _AUTO_MIN_IMI_BITS or 4**bits <= ivf_nlist):
            return "ivf"
        return f"IMI2x{bits}" if bits >= 1 else ("ivf" if ivf_nlist is not None else None)
    if centroids == "ivf":
        if ivf_nlist is None:
            raise ValueError("centroids='ivf' needs an IVF faiss_factory (e.g. 'IVF1024,Flat')")
        return "ivf"
    bits = _imi_bits(centroids)
    if bits is None or not 1 <= bits <= 8:
        raise ValueError(
            f"unknown centroid quantizer {centroids!r}; expected 'auto', 'ivf' or 'IMI2x<b>' with b in 1..8 "
            "(4^b cells, e.g. 'IMI2x8': 65,536)"
        )
    return centroids


class _MultiIndex:
    """A trained FAISS `MultiIndexQuantizer` (2 half-codebooks of `ksub` centroids) as the centroid first
    stage uses it: cell id `a + ksub · b` (FAISS's numbering) for half-centroids `a` (first d/2
    dimensions) and `b` (last d/2), cell centroid `[C0[a], C1[b]]`.

    `assign` is FAISS's rule (nearest cell in L2 = nearest half-centroid in each half, two BLAS matmuls);
    `cell_cosines` / `own_cosines` the cosine of each vector with given cells from its two `[T, ksub]`
    half-scores: `(x0 · C0[a] + x1 · C1[b]) / |[C0[a], C1[b]]|`."""

    def __init__(self, quantizer: Any) -> None:
        faiss = _faiss()
        self.quantizer = quantizer
        pq = quantizer.pq
        self.ksub, self.dsub = int(pq.ksub), int(pq.dsub)
        books = faiss.vector_to_array(pq.centroids).reshape(2, self.ksub, self.dsub).astype(np.float32)
        self.books = books
        self.half_norms = np.einsum("mkd,mkd->mk", books, books)  # [2, ksub] squared norms
        norms = self.half_norms[1][:, None] + self.half_norms[0][None, :]  # [b, a]
        self.inverse_norms = (1.0 / np.sqrt(norms.clip(1e-24))).reshape(-1).astype(np.float32)
        self.nlist = self.ksub * self.ksub

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        halves = []
        for m in range(2):
            part = vectors[:, m * self.dsub : (m + 1) * self.dsub]
            halves.append(np.argmax(part @ self.books[m].T - 0.5 * self.half_norms[m], axis=1))
        return halves[0] + self.ksub * halves[1]

    def half_scores(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[T, ksub]` inner products of each half of `vectors` with its half-codebook."""
        return vectors[:, : self.dsub] @ self.books[0].T, vectors[:, self.dsub :] @ self.books[1].T

    def cell_cosines(self, halves: tuple[np.ndarray, np.ndarray], cells: np.ndarray) -> np.ndarray:
        """`[T, M]` cosines with the cells `[M]`, from the half-scores (no `[T, nlist]` table)."""
        cells = np.asarray(cells, dtype=np.int64)
        first, second = halves
        return (first[:, cells % self.ksub] + second[:, cells // self.ksub]) * self.inverse_norms[cells]

    def own_cosines(self, halves: tuple[np.ndarray, np.ndarray], cells: np.ndarray) -> np.ndarray:
        """`[T, k]` the cosine of each vector with its own cells `[T, k]`."""
        first, second = halves
        return (
            np.take_along_axis(first, cells % self.ksub, 1)
            + np.take_along_axis(second, cells // self.ksub, 1)
        ) * self.inverse_norms[cells]

    def probe(self, halves: tuple[np.ndarray, np.ndarray], nprobe: int) -> np.ndarray:
        """`[T, nprobe]` the `nprobe` nearest cells (L2, FAISS's rule: `assign`'s, and what
        `MultiIndexQuantizer.search` returns) of each vector: the best sums of the two halves' criteria
        lie among the pairs of each half's `nprobe` best, so only `nprobe²` pairs are ranked."""
        picks = []
        for m, scores in enumerate(halves):
            criterion = scores - 0.5 * self.half_norms[m]
            width = min(nprobe, self.ksub)
            best = np.argpartition(-criterion, width - 1, axis=1)[:, :width]
            picks.append((best, np.take_along_axis(criterion, best, 1)))
        (a, va), (b, vb) = picks
        total = (va[:, :, None] + vb[:, None, :]).reshape(a.shape[0], -1)
        cells = (a[:, :, None] + self.ksub * b[:, None, :]).reshape(a.shape[0], -1)
        nprobe = min(nprobe, total.shape[1])
        chosen = np.argpartition(-total, nprobe - 1, axis=1)[:, :nprobe]
        return np.take_along_axis(cells, chosen, 1)


def _new_multi_index(dim: int, spec: str) -> Any:
    if dim % 2:
        raise ValueError(
            f"an inverted multi-index ({spec!r}) splits vectors in halves: dim must be even, got {dim}"
        )
    return _faiss().MultiIndexQuantizer(dim, 2, _imi_bits(spec))


def _train_multi_index(quantizer: Any, vectors: np.ndarray, spec: str) -> None:
    cells = int(quantizer.pq.ksub)
    if vectors.shape[0] < cells:
        raise ValueError(
            f"training the centroid quantizer {spec!r} needs at least {cells} first-stage vectors (its "
            f"half-codebooks' size), got {vectors.shape[0]}: use a smaller 'IMI2x<b>' or more images"
        )
    quantizer.train(np.ascontiguousarray(vectors, dtype=np.float32))


def _trained_quantizer_file(trained: str | os.PathLike) -> Path:
    """Where `write_trained` puts the trained centroid quantizer of a non-IVF centroid first stage."""
    return Path(f"{trained}.centroids.faiss")


# ------------------------------------------------------------------ codecs and token selection


def encode_vectors(vectors: torch.Tensor, codec: str) -> np.ndarray:
    """`[..., d]` float vectors → codes of `codec` (int8: `round(127 · x / max|x|)` per vector)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    vectors = vectors.detach().to("cpu", torch.float32)
    if codec == "int8":
        scale = 127.0 / vectors.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.round(vectors * scale).clamp(-127, 127).to(torch.int8).numpy()
    return vectors.numpy().astype(_NUMPY[codec])


def decode_vectors(codes: np.ndarray) -> torch.Tensor:
    """Codes → float32 vectors, up to a positive scale per vector (all the kernel needs: it normalises)."""
    return torch.from_numpy(np.array(codes, dtype=np.float32))


def select_tokens(
    token_mask: torch.Tensor, keep_weights: torch.Tensor, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the real tokens of highest keep weight (at most `limit`; all real tokens for `None`).

    Returns `(items, positions)` `[T]`: item row and token position of every selected token, grouped by
    item and in token order within it. Ties go to the earlier token.
    """
    valid = token_mask.ne(0)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"a token limit must be >= 1 or None, got {limit}")
        score = torch.where(
            valid, keep_weights.float(), torch.full_like(keep_weights, -1.0, dtype=torch.float)
        )
        order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :limit]
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, order, True)
        valid = valid & chosen
    items, positions = valid.nonzero(as_tuple=True)
    return items, positions


def _unit(vectors: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(vectors.detach().to("cpu", torch.float32), dim=-1).numpy())


def first_stage_query_tokens(
    queries: GranAlignTextOutput, config: Any = None, limit: int | None = None
) -> tuple[np.ndarray, ...]:
    """The caption tokens a first-stage search sends to FAISS: every real token, or each caption's `limit`
    tokens of highest keep weight (`select_tokens`).

    Returns unit vectors `[T, d]` (float32), their query row `[T]` and weight `[T]` (`w_o + w_k · a_i`
    with the config's `effective_level_weights`; `a_i` alone without a config).
    """
    items, positions = select_tokens(queries.token_mask, queries.keep_weights, limit)
    keep = queries.keep_weights[items, positions].float()
    if config is not None:
        original, key = config.effective_level_weights[:2]
        weights = original + key * keep
    else:
        weights = keep
    vectors = _unit(queries.tokens[items, positions])
    return vectors, items.numpy().astype(np.int64), weights.numpy().astype(np.float64)


def _leaky(values: np.ndarray, slope: float) -> np.ndarray:
    return np.where(values >= 0, values, values * slope)


def aggregate_token_hits(
    similarities: np.ndarray,
    images: np.ndarray,
    token_query: np.ndarray,
    token_weight: np.ndarray,
    num_queries: int,
    candidates: int,
    negative_slope: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the images the query tokens retrieved by an approximate caption-side late interaction.

    Args:
        similarities, images: `[T, k]` FAISS results of the `T` query tokens (cosines, image rows; -1
            for no hit).
        token_query, token_weight: `[T]` query row and weight of each token.
        num_queries: Q; candidates: images kept per query.

    The score of (query q, image n) is `Σ_i w_i · LeakyReLU(c_in) / Σ_i w_i` over q's tokens, `c_in` the
    best cosine among n's retrieved tokens for token i, or token i's lowest retrieved cosine when none of
    n's tokens was retrieved. Returns scores and image rows `[Q, candidates]`, best first (-inf / -1 where
    a query retrieved fewer images).
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    images = np.asarray(images, dtype=np.int64)
    num_tokens, width = images.shape
    out_scores = torch.full((num_queries, candidates), -torch.inf)
    out_rows = torch.full((num_queries, candidates), -1, dtype=torch.long)
    valid = images >= 0
    values = _leaky(similarities, negative_slope)
    floor = np.where(valid, values, np.inf).min(axis=1) if width else np.zeros(num_tokens)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    weight_sum = np.bincount(token_query, token_weight, minlength=num_queries)
    base = np.bincount(token_query, token_weight * floor, minlength=num_queries)
    token_of = np.repeat(np.arange(num_tokens, dtype=np.int64), width)[valid.ravel()]
    image_of = images.ravel()[valid.ravel()]
    value_of = values.ravel()[valid.ravel()]
    if image_of.size == 0:
        return out_scores, out_rows
    span = int(image_of.max()) + 1
    # best hit of each (token, image): the max over the image's retrieved tokens
    key = token_of * span + image_of
    order = np.argsort(key, kind="stable")
    key, value_of = key[order], value_of[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    best = np.maximum.reduceat(value_of, starts)
    token_of, image_of = key[starts] // span, key[starts] % span
    gain = token_weight[token_of] * (best - floor[token_of])
    pair = token_query[token_of] * span + image_of
    pairs, inverse = np.unique(pair, return_inverse=True)
    total = np.bincount(inverse, gain)
    query_of, image_of = pairs // span, pairs % span
    score = (base[query_of] + total) / np.maximum(weight_sum[query_of], 1e-12)
    order = np.lexsort((image_of, -score, query_of))  # per query: best first, ties to the lower row
    query_of, image_of, score = query_of[order], image_of[order], score[order]
    bounds = np.searchsorted(query_of, np.arange(num_queries + 1))
    for query in range(num_queries):
        start, stop = bounds[query], min(bounds[query + 1], bounds[query] + candidates)
        count = stop - start
        out_scores[query, :count] = torch.from_numpy(score[start:stop].astype(np.float32))
        out_rows[query, :count] = torch.from_numpy(image_of[start:stop])
    return out_scores, out_rows


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]) if counts.size else counts


def _gather_segments(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat positions `[Σ counts]` of the segments `[starts[j], starts[j] + counts[j])`, in order."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - _segment_starts(counts), counts)
    return shift + np.arange(total, dtype=np.int64)


def centroid_interaction(
    token_scores: np.ndarray, token_weight: np.ndarray, centroid_ids: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """PLAID's centroid interaction of one query with `R` candidate images.

    Args:
        token_scores: `[T, nlist]` per query token and centroid the (LeakyReLU'd) score.
        token_weight: `[T]` weight of each query token.
        centroid_ids: `[Σ counts]` the candidates' token centroids, candidate after candidate.
        counts: `[R]` tokens per candidate (each >= 1).

    Returns `[R]`: `Σ_i w_i · max_{c ∈ C(n)} s_ic / Σ_i w_i`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return np.zeros(0)
    if int(counts.min()) < 1:
        raise ValueError("every candidate of a centroid interaction needs at least one token centroid")
    return _segment_interaction(
        token_scores[:, np.asarray(centroid_ids, dtype=np.int64)], token_weight, counts
    )


def _segment_interaction(
    similarities: np.ndarray, token_weight: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Late interaction `[R]` of one query's `[T, Σ counts]` token similarities with `R` candidates whose
    tokens are consecutive segments of `counts` (each >= 1): `Σ_i w_i · max over the segment / Σ_i w_i`."""
    best = np.maximum.reduceat(similarities, _segment_starts(counts), axis=1)  # [T, R]
    weight = np.asarray(token_weight, dtype=np.float64)
    return (weight @ best) / max(float(weight.sum()), 1e-12)


def _top(scores: np.ndarray, rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` best (score, row) pairs, best first, ties to the lower row."""
    if scores.size > count:
        keep = np.argpartition(-scores, count - 1)[:count]
        threshold = scores[keep].min()
        keep = np.flatnonzero(scores >= threshold)  # every tie at the boundary, then cut after sorting
        scores, rows = scores[keep], rows[keep]
    order = np.lexsort((rows, -scores))[:count]
    return scores[order], rows[order]


# ------------------------------------------------------------------ the re-rank store


class TokenStore:
    """Append-only, memory-mapped per-image token storage (see the module docstring for the files)."""

    def __init__(self, path: str | os.PathLike, dim: int, num_regions: int, codec: str) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
        self.path, self.dim, self.num_regions, self.codec = Path(path), dim, num_regions, codec
        self._maps: dict[str, np.ndarray] | None = None
        self._offsets: np.ndarray | None = None

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.bin"

    def _spec(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        code = _NUMPY[self.codec]
        spec = {
            "tokens": (code, (self.dim,)),
            "keep": (np.float16, ()),
            "lengths": (np.int32, ()),
            "embeds": (np.float16, (self.dim,)),
        }
        if self.num_regions:
            spec["regions"] = (code, (self.num_regions, self.dim))
        return spec

    def append(
        self,
        tokens: np.ndarray,
        keep: np.ndarray,
        lengths: np.ndarray,
        regions: np.ndarray | None,
        embeds: np.ndarray,
    ) -> None:
        """Append encoded arrays (already in the store's dtypes and shapes) to the files."""
        arrays = {"tokens": tokens, "keep": keep, "lengths": lengths, "embeds": embeds}
        if self.num_regions:
            arrays["regions"] = regions
        for name, (dtype, shape) in self._spec().items():
            value = np.ascontiguousarray(arrays[name], dtype=dtype)
            if value.shape[1:] != shape:
                raise ValueError(
                    f"store field {name} must be [*, {', '.join(map(str, shape))}], got {value.shape}"
                )
            with open(self._file(name), "ab") as handle:
                handle.write(value.tobytes())
        self._maps = None
        self._offsets = None

    def _map(self, name: str) -> np.ndarray:
        if self._maps is None:
            self._maps = {}
            for field, (dtype, shape) in self._spec().items():
                file = self._file(field)
                size = file.stat().st_size if file.exists() else 0
                item = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
                count = size // item
                self._maps[field] = (
                    np.memmap(file, dtype=dtype, mode="r", shape=(count, *shape))
                    if count
                    else np.zeros((0, *shape), dtype=dtype)
                )
        return self._maps[name]

    def __len__(self) -> int:
        return self._map("lengths").shape[0]

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            lengths = np.asarray(self._map("lengths"), dtype=np.int64)
            self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        return self._offsets

    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def nbytes(self) -> int:
        return sum(self._file(name).stat().st_size for name in self._spec() if self._file(name).exists())

    def outputs(self, rows: torch.Tensor | Sequence[int]) -> GranAlignImageOutput:
        """The stored images at `rows`, decoded to float32 outputs padded to their longest token count."""
        rows = np.asarray(torch.as_tensor(rows, dtype=torch.long).cpu().numpy(), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"store rows must lie in [0, {len(self)})")
        starts, lengths = self.offsets[rows], np.asarray(self._map("lengths")[rows], dtype=np.int64)
        width = max(int(lengths.max()) if rows.size else 1, 1)
        # decoded in numpy (torch's int8 -> float32 indexed copy is ~10x slower), one read per image
        tokens = np.zeros((rows.size, width, self.dim), dtype=np.float32)
        keep = np.zeros((rows.size, width), dtype=np.float32)
        mask = np.zeros((rows.size, width), dtype=np.int64)
        codes, weights = self._map("tokens"), self._map("keep")
        for slot, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            tokens[slot, :length] = codes[start : start + length]
            keep[slot, :length] = weights[start : start + length]
            mask[slot, :length] = 1
        tokens, keep, mask = torch.from_numpy(tokens), torch.from_numpy(keep), torch.from_numpy(mask)
        regions = decode_vectors(self._map("regions")[rows]) if self.num_regions else None
        embeds = torch.from_numpy(np.asarray(self._map("embeds")[rows], dtype=np.float32))
        return GranAlignImageOutput(
            tokens=tokens, token_mask=mask, keep_weights=keep, region_tokens=regions, image_embeds=embeds
        )


# ------------------------------------------------------------------ the index


class TokenIndex:
    """A multi-vector image index on disk: FAISS first stage over token vectors + exact GRM re-rank.

    Example:
    ```python
    >>> index = TokenIndex.create("gallery.tokens", model, dim=512, num_regions=5, codec="int8")
    >>> for ids, images in chunks:              # e.g. encode_images(model, processor, paths[i : i + 256])
    ...     index.add(images, ids)
    >>> index.save()
    >>> TokenIndex.open("gallery.tokens", model=model).search(model, captions, k=10).ids
    ```
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], faiss_index: Any = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.store = TokenStore(self.path, meta["dim"], meta["num_regions"], meta["codec"])
        self.ids: list[str] = []
        self._id_set: set[str] = set()
        self.faiss_index = faiss_index
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # FAISS training buffer (vectors, rows)
        self._pending_count = 0
        self._centroid_cache: dict[str, np.ndarray] | None = None
        #: the FAISS MultiIndexQuantizer of an "IMI2x<b>" centroid first stage (None: the IVF's quantizer)
        self.centroid_quantizer: Any = None
        self._multi_cache: _MultiIndex | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        *,
        dim: int,
        num_regions: int,
        codec: str = "int8",
        first_stage_tokens: int | None = 32,
        rerank_tokens: int | None = None,
        faiss_factory: str = "IVF1024,PQ64x4fs",
        train_size: int = 131_072,
        trained: str | os.PathLike | None = None,
        fingerprint: str | None = None,
        token_codes: bool = True,
        first_stage_codes: bool = True,
        centroids: str = "auto",
        expected_items: int | None = None,
    ) -> TokenIndex:
        """A new, empty index directory at `path` (which must not hold an index).

        Args:
            model: the encoding model (its fingerprint is stored; or pass `fingerprint`).
            dim, num_regions: token size d and region count K (0: a model without region prompting).
            codec: storage of the re-rank tokens and regions: "float32", "float16" or "int8".
            first_stage_tokens: tokens per image in the FAISS index (highest keep weight; None: all).
            rerank_tokens: tokens per image kept for the re-rank (highest keep weight; None: all, exact).
            faiss_factory: FAISS `index_factory` string (inner product) of the first stage.
            train_size: first-stage vectors buffered to train it (IVF / PQ), then added.
            trained: a trained, empty FAISS index file to start from (shards of one build share it).
            token_codes: add the first-stage vectors to FAISS (needed by `mode="tokens"`); False keeps
                FAISS as the (trained) coarse quantizer only, for a centroid-only first stage (an IVF
                factory is then required).
            first_stage_codes: with a centroid first stage, also store the first-stage tokens in `codec`
                (d bytes per token in int8), which `refine` scores exactly.
            centroids: the coarse quantizer of the centroid first stage (`mode="centroids"`): "ivf" (the
                IVF factory's own quantizer: `nlist` fixed by the factory), "IMI2x<b>" (a FAISS inverted
                multi-index of 4^b cells from two 2^b-centroid half-codebooks, trained on the same sample;
                any factory; cheap to train and assign at 65,536 cells) or "auto" (`resolve_centroids`:
                with `expected_items`, PLAID's cell count for the gallery, `plaid_nlist`; without it,
                "ivf" for an IVF factory, else no centroid first stage).
            expected_items: the gallery size the index is built for (only "auto" reads it).

        A centroid first stage stores every first-stage token's cell, for `mode="centroids"`.
        """
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
        path = Path(path)
        if (path / "meta.json").exists():
            raise FileExistsError(f"{str(path)!r} already holds a token index: open it to append")
        path.mkdir(parents=True, exist_ok=True)
        faiss = _faiss()
        if trained is not None:
            index = faiss.read_index(str(trained))
        else:
            index = faiss.index_factory(dim, faiss_factory, faiss.METRIC_INNER_PRODUCT)
            if _ivf(index) is None:  # flat or graph indices take no ids of their own
                index = faiss.IndexIDMap2(index)
        if index.ntotal:
            raise ValueError("a trained starting index must be empty")
        ivf = _top_level_ivf(index)
        quantizer = resolve_centroids(
            centroids, expected_items, first_stage_tokens, None if ivf is None else ivf.nlist
        )
        if not token_codes and quantizer is None:
            raise ValueError(
                f"token_codes=False keeps only the coarse centroids, which needs an IVF faiss_factory "
                f"(e.g. 'IVF1024,Flat') or centroids='IMI2x<b>', got {faiss_factory!r}"
            )
        multi = None
        if quantizer not in (None, "ivf"):
            if trained is not None:
                file = _trained_quantizer_file(trained)
                if not file.is_file():
                    raise FileNotFoundError(f"the trained start has no centroid quantizer {str(file)!r}")
                multi = faiss.read_index(str(file))
                if int(multi.pq.ksub) ** 2 != 4 ** _imi_bits(quantizer):
                    raise ValueError(f"the trained centroid quantizer {str(file)!r} is not {quantizer!r}")
            else:
                multi = _new_multi_index(dim, quantizer)
        nlist = (
            None if quantizer is None else (ivf.nlist if quantizer == "ivf" else 4 ** _imi_bits(quantizer))
        )
        meta = {
            "format": TOKEN_INDEX_FORMAT,
            "version": TOKEN_INDEX_VERSION,
            "model_fingerprint": fingerprint if fingerprint is not None else model_fingerprint(model),
            "model_revision": model_revision(model) if model is not None else None,
            "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "dim": int(dim),
            "num_regions": int(num_regions),
            "codec": codec,
            "first_stage_tokens": first_stage_tokens,
            "rerank_tokens": rerank_tokens,
            "faiss_factory": faiss_factory,
            "train_size": int(train_size),
            "num_items": 0,
            "token_codes": bool(token_codes),
            "centroid_dtype": None if nlist is None else ("uint16" if nlist <= 65536 else "int32"),
            "centroid_quantizer": quantizer,
            "centroid_lists_items": -1,
            "first_stage_codes": bool(first_stage_codes) and quantizer is not None,
        }
        (path / "ids.txt").write_text("")
        result = cls(path, meta, index)
        result.centroid_quantizer = multi
        result.save()  # an empty index on disk can be opened and appended to
        return result

    @classmethod
    def open(cls, path: str | os.PathLike, model: Any = None) -> TokenIndex:
        """Open an index directory (to search or append); with `model`, refuse another model's index."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"no token index at {str(path)!r}")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != TOKEN_INDEX_FORMAT or meta.get("version") != TOKEN_INDEX_VERSION:
            raise ValueError(
                f"{str(path)!r} is not a version-{TOKEN_INDEX_VERSION} granalign token index "
                f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
            )
        faiss = _faiss()
        index = faiss.read_index(str(path / _FAISS_FILE))
        result = cls(path, meta, index)
        if result.quantizer_spec not in (None, "ivf"):
            result.centroid_quantizer = faiss.read_index(str(path / _QUANTIZER_FILE))
        result.ids = (path / "ids.txt").read_text().splitlines()
        result._id_set = set(result.ids)
        if len(result.ids) != meta["num_items"] or len(result.store) != meta["num_items"]:
            raise ValueError(
                f"{str(path)!r} is damaged: meta says {meta['num_items']} items, ids.txt has "
                f"{len(result.ids)} and the store {len(result.store)}"
            )
        if model is not None:
            result.check_model(model)
        return result

    def check_model(self, model: Any) -> None:
        fingerprint = model_fingerprint(model)
        if fingerprint != self.meta["model_fingerprint"]:
            stored = describe_model(
                self.meta["model_fingerprint"],
                self.meta.get("model_revision"),
                self.meta.get("model_name_or_path"),
            )
            raise ValueError(
                f"this token index was built by model {stored}, not by the given model "
                f"({fingerprint[:12]}): rebuild it with this model"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"TokenIndex({len(self)} images at {str(self.path)!r}, codec={self.meta['codec']}, "
            f"first stage {self.meta['faiss_factory']!r} over {self.meta['first_stage_tokens']} tokens/image)"
        )

    # ------------------------------------------------------------------ adding

    def add(self, outputs: GranAlignImageOutput, ids: Sequence[str]) -> TokenIndex:
        """Append encoded images (one new id each): their tokens go to disk, their first-stage vectors to
        FAISS (or to the training buffer until `train_size` vectors are collected)."""
        ids = [str(item) for item in ids]
        count = outputs.tokens.shape[0]
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} encoded images")
        if len(set(ids)) != len(ids) or self._id_set.intersection(ids):
            clash = sorted({i for i in ids if ids.count(i) > 1} | self._id_set.intersection(ids))
            raise ValueError(f"image ids must be new and unique; repeated: {clash[:5]}")
        if outputs.tokens.shape[-1] != self.meta["dim"]:
            raise ValueError(f"expected {self.meta['dim']}-d tokens, got {outputs.tokens.shape[-1]}")
        regions = getattr(outputs, "region_tokens", None)
        num_regions = 0 if regions is None else regions.shape[1]
        if num_regions != self.meta["num_regions"]:
            raise ValueError(
                f"expected {self.meta['num_regions']} region tokens per image, got {num_regions}"
            )
        for name in ("tokens", "keep_weights", "image_embeds") + (("region_tokens",) if num_regions else ()):
            if not bool(torch.isfinite(getattr(outputs, name)).all()):
                raise ValueError(f"the images' {name} hold NaN or infinite values")
        first = len(self)
        codec = self.meta["codec"]
        items, positions = select_tokens(outputs.token_mask, outputs.keep_weights, self.meta["rerank_tokens"])
        lengths = np.bincount(items.numpy(), minlength=count).astype(np.int32)
        self.store.append(
            encode_vectors(outputs.tokens[items, positions], codec),
            outputs.keep_weights[items, positions].float().numpy().astype(np.float16),
            lengths,
            encode_vectors(regions, codec) if num_regions else None,
            outputs.image_embeds.detach().float().cpu().numpy().astype(np.float16),
        )
        items, positions = select_tokens(
            outputs.token_mask, outputs.keep_weights, self.meta["first_stage_tokens"]
        )
        vectors = _unit(outputs.tokens[items, positions])
        if self.has_centroids:
            self._append_centroid_counts(np.bincount(items.numpy(), minlength=count))
        if self.meta.get("first_stage_codes"):
            with open(self.path / _FS_CODES_FILE, "ab") as handle:
                handle.write(encode_vectors(outputs.tokens[items, positions], codec).tobytes())
        self._add_first_stage(vectors, items.numpy().astype(np.int64) + first)
        self.ids.extend(ids)
        self._id_set.update(ids)
        with open(self.path / "ids.txt", "a") as handle:
            handle.write("".join(f"{item}\n" for item in ids))
        self.meta["num_items"] = len(self.ids)
        return self

    def add_chunks(self, chunks: Iterable[tuple[Sequence[str], GranAlignImageOutput]]) -> TokenIndex:
        """`add` each `(ids, outputs)` chunk as it comes: an iterator of encoded chunks is read one at a
        time, each released before the next is read (the streamed build). Returns self, not saved."""
        for ids, outputs in chunks:
            self.add(outputs, ids)
            del ids, outputs  # not held while the next chunk is encoded
        return self

    @property
    def quantizer_spec(self) -> str | None:
        """The centroid first stage's quantizer: "ivf", "IMI2x<b>" or None (indices from before the
        option: "ivf" where they store centroid ids)."""
        if self.meta.get("centroid_dtype") is None:
            return None
        return self.meta.get("centroid_quantizer") or "ivf"

    def _faiss_needs_training(self) -> bool:
        """Whether the FAISS index is used (token codes, or its quantizer gives the centroids) and untrained."""
        used = self.meta.get("token_codes", True) or self.quantizer_spec == "ivf"
        return used and not self.faiss_index.is_trained

    def _is_trained(self) -> bool:
        multi = self.centroid_quantizer
        return not self._faiss_needs_training() and (multi is None or multi.is_trained)

    def _train(self, vectors: np.ndarray) -> None:
        if self._faiss_needs_training():
            self.faiss_index.train(vectors)
        if self.centroid_quantizer is not None and not self.centroid_quantizer.is_trained:
            _train_multi_index(self.centroid_quantizer, vectors, self.quantizer_spec)
            self._multi_cache = None

    def _assign(self, vectors: np.ndarray) -> np.ndarray:
        """The centroid first stage's cell of each unit first-stage vector `[T, d]`."""
        if self.centroid_quantizer is not None:
            return self._multi().assign(vectors)
        return _top_level_ivf(self.faiss_index).quantizer.assign(vectors, 1)[:, 0]

    def _multi(self) -> _MultiIndex:
        if self._multi_cache is None or self._multi_cache.quantizer is not self.centroid_quantizer:
            self._multi_cache = _MultiIndex(self.centroid_quantizer)
        return self._multi_cache

    def _nlist(self) -> int:
        if self.centroid_quantizer is not None:
            return int(self.centroid_quantizer.pq.ksub) ** 2
        return int(_top_level_ivf(self.faiss_index).nlist)

    def _add_first_stage(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        if self._is_trained() and not self._pending:
            self._add_trained(vectors, rows)
            return
        self._pending.append((vectors, rows))
        self._pending_count += len(vectors)
        if self._pending_count >= self.meta["train_size"]:
            self._flush_pending()

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        vectors = np.concatenate([v for v, _ in self._pending])
        rows = np.concatenate([r for _, r in self._pending])
        if not self._is_trained():
            self._train(vectors[: self.meta["train_size"]])
        self._add_trained(vectors, rows)
        self._pending, self._pending_count = [], 0

    def _add_trained(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Add first-stage vectors `[T, d]` (unit) of image `rows` `[T]` to the trained first stage."""
        if self.meta.get("token_codes", True):
            self.faiss_index.add_with_ids(vectors, rows)
        if self.has_centroids:
            assigned = self._assign(vectors)
            with open(self.path / _CENTROID_FILES[0], "ab") as handle:
                handle.write(assigned.astype(self.meta["centroid_dtype"]).tobytes())
        self._centroid_cache = None

    def _append_centroid_counts(self, counts: np.ndarray) -> None:
        """Append the first-stage token count of each new image `[n]` (their centroids follow in order)."""
        with open(self.path / _CENTROID_FILES[1], "ab") as handle:
            handle.write(np.asarray(counts, dtype=np.int32).tobytes())
        self._centroid_cache = None

    def train_first_stage(self, sample: GranAlignImageOutput) -> None:
        """Train the (empty) FAISS index on the first-stage vectors of a sample of images."""
        items, positions = select_tokens(
            sample.token_mask, sample.keep_weights, self.meta["first_stage_tokens"]
        )
        self._train(_unit(sample.tokens[items, positions]))

    def write_trained(self, file: str | os.PathLike) -> None:
        """Write the trained, still empty FAISS index (the shared start of sharded builds), and a
        multi-index centroid quantizer next to it (`<file>.centroids.faiss`)."""
        if self.faiss_index.ntotal or len(self):
            raise ValueError("write_trained needs an empty, trained index")
        _faiss().write_index(self.faiss_index, str(file))
        if self.centroid_quantizer is not None:
            _faiss().write_index(self.centroid_quantizer, str(_trained_quantizer_file(file)))

    def save(self) -> TokenIndex:
        """Train on what is buffered if needed (a gallery smaller than `train_size`), write FAISS, the
        centroid lists and meta."""
        self._flush_pending()
        _faiss().write_index(self.faiss_index, str(self.path / _FAISS_FILE))
        if self.centroid_quantizer is not None:
            _faiss().write_index(self.centroid_quantizer, str(self.path / _QUANTIZER_FILE))
        if self.has_centroids:
            self._write_centroid_lists()
        self._write_meta()
        return self

    # ------------------------------------------------------------------ centroid lists

    @property
    def has_centroids(self) -> bool:
        """Whether the index stores the coarse centroid of every first-stage token (`mode="centroids"`)."""
        return self.meta.get("centroid_dtype") is not None

    @property
    def default_mode(self) -> str:
        """The first-stage mode used when none is given: "centroids" where the index stores them."""
        return "centroids" if self.has_centroids else "tokens"

    def _centroid_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped centroid ids `[T_fs]` and first-stage token counts `[N]`."""
        arrays = []
        for name, dtype in zip(_CENTROID_FILES, (self.meta["centroid_dtype"], np.int32), strict=True):
            file = self.path / name
            size = file.stat().st_size // np.dtype(dtype).itemsize if file.exists() else 0
            arrays.append(
                np.memmap(file, dtype=dtype, mode="r", shape=(size,)) if size else np.zeros(0, dtype)
            )
        return arrays[0], arrays[1]

    def _write_centroid_lists(self) -> None:
        """Derive the inverted lists centroid → unique image rows from `centroids.bin` (when stale)."""
        if self.meta.get("centroid_lists_items") == len(self.ids) and all(
            (self.path / name).exists() for name in _LIST_FILES
        ):
            return
        centroids, counts = self._centroid_arrays()
        if counts.shape[0] != len(self.ids) or int(counts.sum(dtype=np.int64)) != centroids.shape[0]:
            raise ValueError(
                f"{str(self.path)!r} is damaged: {counts.shape[0]} centroid counts summing to "
                f"{int(counts.sum(dtype=np.int64))} for {len(self.ids)} images and {centroids.shape[0]} ids"
            )
        nlist = self._nlist()
        rows = np.repeat(np.arange(len(self.ids), dtype=np.int64), np.asarray(counts, dtype=np.int64))
        keys = np.unique(np.asarray(centroids, dtype=np.int64) * max(len(self.ids), 1) + rows)
        lists = (keys % max(len(self.ids), 1)).astype(np.int32)
        offsets = np.concatenate(
            [[0], np.cumsum(np.bincount(keys // max(len(self.ids), 1), minlength=nlist))]
        )
        for name, array in zip(_LIST_FILES, (lists, offsets.astype(np.int64)), strict=True):
            tmp = self.path / f"{name}.tmp"
            array.tofile(tmp)
            os.replace(tmp, self.path / name)
        self.meta["centroid_lists_items"] = len(self.ids)
        self._centroid_cache = None

    def build_centroid_ids(self) -> TokenIndex:
        """Store the centroid ids of an IVF index built without them (read from FAISS's inverted lists;
        within an image they come sorted by centroid, not in token order), then save."""
        if self.has_centroids:
            return self
        ivf = _top_level_ivf(self.faiss_index)
        if ivf is None or not self.faiss_index.ntotal or not self.meta.get("token_codes", True):
            raise ValueError(
                f"centroid ids can be read only from a filled IVF first stage, not {self.meta['faiss_factory']!r}"
            )
        faiss = _faiss()
        lists, rows = [], []
        for centroid in range(ivf.nlist):
            size = ivf.invlists.list_size(centroid)
            if size:
                rows.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(centroid), size).copy())
                lists.append(np.full(size, centroid, dtype=np.int64))
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        lists_all = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        order = np.lexsort((lists_all, rows_all))
        self.meta["centroid_dtype"] = "uint16" if ivf.nlist <= 65536 else "int32"
        self.meta["centroid_quantizer"] = "ivf"
        self.centroid_quantizer = None
        (self.path / _QUANTIZER_FILE).unlink(missing_ok=True)
        self.meta.setdefault("token_codes", True)
        for name in _CENTROID_FILES + _LIST_FILES:
            (self.path / name).unlink(missing_ok=True)
        self.meta["centroid_lists_items"] = -1
        with open(self.path / _CENTROID_FILES[0], "wb") as handle:
            handle.write(lists_all[order].astype(self.meta["centroid_dtype"]).tobytes())
        self._append_centroid_counts(np.bincount(rows_all, minlength=len(self.ids)))
        return self.save()

    def assign_centroids(self, centroids: str, chunk: int = 65536) -> TokenIndex:
        """Replace the centroid first stage's quantizer and cells of a saved index, then save.

        `centroids`: "ivf" (the cells are read back from the FAISS IVF lists, `build_centroid_ids`: exactly
        what `add` would have stored) or "IMI2x<b>": a multi-index trained on the first `train_size`
        first-stage tokens and assigned to every one, both decoded from `first_stage_codes.bin` (so from
        the codec's codes, not the float tokens `add` sees: with int8 codes a few tokens may fall in a
        neighbouring cell). Streams `chunk` tokens at a time."""
        ivf = _top_level_ivf(self.faiss_index)
        spec = resolve_centroids(
            centroids, len(self) or None, self.meta["first_stage_tokens"], None if ivf is None else ivf.nlist
        )
        if spec == self.quantizer_spec:
            return self
        if spec is None:
            raise ValueError(f"centroids={centroids!r} resolves to no centroid first stage for this index")
        if spec == "ivf":
            if not self.faiss_index.ntotal or not self.meta.get("token_codes", True):
                raise ValueError(
                    "assign_centroids('ivf') reads the cells from the FAISS IVF lists, which this index "
                    "does not fill (token_codes=False or empty): rebuild it with centroids='ivf'"
                )
            self.meta["centroid_dtype"] = None
            return self.build_centroid_ids()
        if not self.meta.get("first_stage_codes"):
            raise ValueError(
                f"assign_centroids({centroids!r}) reads the first-stage token codes, which this index does not "
                "store: run build_first_stage_codes() first"
            )
        self._flush_pending()
        file = self.path / _FS_CODES_FILE
        dtype, dim = np.dtype(_NUMPY[self.meta["codec"]]), self.meta["dim"]
        codes = np.memmap(
            file, dtype=dtype, mode="r", shape=(file.stat().st_size // (dtype.itemsize * dim), dim)
        )
        quantizer = _new_multi_index(dim, spec)

        def unit(start: int, stop: int) -> np.ndarray:
            vectors = np.asarray(codes[start:stop], dtype=np.float32)
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)

        _train_multi_index(quantizer, unit(0, min(self.meta["train_size"], codes.shape[0])), spec)
        self.centroid_quantizer, self._multi_cache = quantizer, None
        self.meta["centroid_quantizer"] = spec
        self.meta["centroid_dtype"] = "uint16"
        tmp = self.path / f"{_CENTROID_FILES[0]}.tmp"
        with open(tmp, "wb") as handle:
            for start in range(0, codes.shape[0], chunk):
                handle.write(self._assign(unit(start, start + chunk)).astype(np.uint16).tobytes())
        os.replace(tmp, self.path / _CENTROID_FILES[0])
        for name in _LIST_FILES:
            (self.path / name).unlink(missing_ok=True)
        self.meta["centroid_lists_items"] = -1
        self._centroid_cache = None
        return self.save()

    def _centroids(self) -> dict[str, np.ndarray]:
        """What the centroid first stage reads: unit centroids `[nlist, d]`, lists, offsets, ids, counts."""
        if not self.has_centroids:
            raise ValueError(
                f"this token index stores no centroid ids (first stage {self.meta['faiss_factory']!r}): "
                "mode='centroids' needs an IVF first stage or centroids='IMI2x<b>' (an older IVF index: run "
                "build_centroid_ids(); any index with first-stage codes: assign_centroids('IMI2x<b>'))"
            )
        if self._pending or self.meta.get("centroid_lists_items") != len(self.ids):
            self._flush_pending()
            self._write_centroid_lists()
        if self._centroid_cache is None:
            if self.centroid_quantizer is None:
                ivf = _top_level_ivf(self.faiss_index)
                matrix = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
                matrix /= np.linalg.norm(matrix, axis=1, keepdims=True).clip(1e-12)
            else:
                matrix = None  # a multi-index scores its cells from two half-codebooks (_MultiIndex)
            ids, counts = self._centroid_arrays()
            counts = np.asarray(counts, dtype=np.int64)
            lists = (
                np.fromfile(self.path / _LIST_FILES[0], dtype=np.int32)
                if len(self.ids)
                else np.zeros(0, np.int32)
            )
            offsets = np.fromfile(self.path / _LIST_FILES[1], dtype=np.int64)
            self._centroid_cache = {
                "matrix": matrix, "lists": lists, "offsets": offsets, "ids": ids, "counts": counts,
                "starts": _segment_starts(counts), "nlist": offsets.shape[0] - 1,
            }  # fmt: skip
        return self._centroid_cache

    def _write_meta(self) -> None:
        self.meta["num_items"] = len(self.ids)
        self.meta["num_tokens"] = self.store.num_tokens() if len(self.ids) else 0
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.path / "meta.json")

    # ------------------------------------------------------------------ sizes

    def nbytes(self) -> dict[str, int]:
        """Bytes on disk: the re-rank store, the FAISS first stage, the centroid ids and lists and the
        first-stage token codes."""
        faiss_file = self.path / _FAISS_FILE
        files = [self.path / name for name in (*_CENTROID_FILES, *_LIST_FILES, _QUANTIZER_FILE)]
        codes = self.path / _FS_CODES_FILE
        return {
            "store": self.store.nbytes(),
            "first_stage": faiss_file.stat().st_size if faiss_file.exists() else 0,
            "centroids": sum(file.stat().st_size for file in files if file.exists()),
            "first_stage_codes": codes.stat().st_size if codes.exists() else 0,
        }

    # ------------------------------------------------------------------ search

    def first_stage(
        self,
        queries: GranAlignTextOutput,
        candidates: int = 20,
        token_k: int = 256,
        search_params: str = "",
        config: Any = None,
        query_tokens: int | None = None,
        mode: str | None = None,
        nprobe: int = 2,
        ndocs: int = 256,
        refine: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate scores and image rows `[Q, candidates]` of each caption's best candidates.

        `query_tokens`: search only each caption's that many tokens of highest keep weight (None: all).
        `mode`: "tokens" (FAISS token hits, `token_k` and `search_params`) or "centroids" (PLAID,
        `nprobe`, `ndocs`, `refine`; see the module docstring); None: `default_mode`. `refine` None:
        `max(64, candidates)` where the index stores first-stage codes, else 0 (off).

        `search_params`: FAISS parameters, e.g. ``"nprobe=16"`` (IVF) or ``"efSearch=128"`` (HNSW).
        """
        mode = self.default_mode if mode is None else mode
        if mode not in FIRST_STAGE_MODES:
            raise ValueError(f"unknown first-stage mode {mode!r}; expected one of {FIRST_STAGE_MODES}")
        if mode == "centroids":
            if refine is None:  # the measured default (benchmarks/README.md): refine 64 where codes exist
                refine = max(DEFAULT_REFINE, candidates) if self.meta.get("first_stage_codes") else 0
            return self._centroid_first_stage(
                queries, candidates, nprobe, ndocs, refine, config, query_tokens
            )
        if not self.meta.get("token_codes", True):
            raise ValueError(
                "this token index holds centroids only (token_codes=False): use mode='centroids'"
            )
        if candidates < 1 or token_k < 1:
            raise ValueError(f"candidates and token_k must be >= 1, got {candidates} and {token_k}")
        if self._pending:
            self._flush_pending()
        faiss = _faiss()
        if search_params:
            faiss.ParameterSpace().set_index_parameters(self.faiss_index, search_params)
        vectors, token_query, token_weight = first_stage_query_tokens(queries, config, query_tokens)
        token_k = min(token_k, max(int(self.faiss_index.ntotal), 1))
        similarities, images = self.faiss_index.search(vectors, token_k)
        slope = getattr(config, "similarity_negative_slope", 0.1)
        return aggregate_token_hits(
            similarities, images, token_query, token_weight, queries.tokens.shape[0], candidates, slope
        )

    def _centroid_first_stage(
        self,
        queries: GranAlignTextOutput,
        candidates: int,
        nprobe: int,
        ndocs: int,
        refine: int,
        config: Any,
        query_tokens: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PLAID candidate generation, centroid interaction and optional refinement (module docstring)."""
        if candidates < 1 or nprobe < 1 or ndocs < 1 or refine < 0:
            raise ValueError(
                f"candidates, nprobe and ndocs must be >= 1 and refine >= 0, got candidates={candidates}, "
                f"nprobe={nprobe}, ndocs={ndocs}, refine={refine}"
            )
        if refine and refine < candidates:
            raise ValueError(f"refine ({refine}) must be 0 or >= candidates ({candidates})")
        data = self._centroids()
        lists, offsets = data["lists"], data["offsets"]
        nlist, count = data["nlist"], len(self.ids)
        nprobe = min(nprobe, nlist)
        slope = getattr(config, "similarity_negative_slope", 0.1)
        vectors, token_query, token_weight = first_stage_query_tokens(queries, config, query_tokens)
        multi = self._multi() if self.centroid_quantizer is not None else None
        # IVF: one [T, nlist] table of (LeakyReLU'd) cosines; a multi-index: its half-scores only
        scores = _leaky(vectors @ data["matrix"].T, slope) if multi is None else None
        num_queries = queries.tokens.shape[0]
        out_scores = torch.full((num_queries, candidates), -torch.inf)
        out_rows = torch.full((num_queries, candidates), -1, dtype=torch.long)
        if "best" not in data:  # per-image buffers, kept between calls (every query resets what it wrote)
            data["best"] = np.full(count, -np.inf, dtype=np.float32)  # this token's best probed score
            data["total"] = np.zeros(count, dtype=np.float64)  # Σ_i w_i (best_i - floor_i)
            data["seen"] = np.zeros(count, dtype=bool)
        best, total, seen = data["best"], data["total"], data["seen"]
        for query in range(num_queries):
            tokens = np.flatnonzero(token_query == query)
            if tokens.size == 0 or count == 0:
                continue
            weight = token_weight[tokens]
            # 1. candidate generation: the images of each token's nprobe best centroids
            if multi is None:
                token_scores = scores[tokens]
                probed = np.argpartition(-token_scores, nprobe - 1, axis=1)[:, :nprobe]
                probed_scores = np.take_along_axis(token_scores, probed, 1)
            else:  # the nprobe nearest cells, scored by their cosines like the IVF's
                halves = multi.half_scores(vectors[tokens])
                probed = multi.probe(halves, nprobe)
                probed_scores = _leaky(multi.own_cosines(halves, probed), slope)
            order = np.argsort(probed_scores, axis=1, kind="stable")  # ascending: later writes win
            probed = np.take_along_axis(probed, order, 1)
            probed_scores = np.take_along_axis(probed_scores, order, 1)
            floor = probed_scores[:, 0].astype(np.float64)
            for token in range(tokens.size):  # a loop over T · nprobe lists, vectorised within each
                pieces = []
                for centroid, value in zip(
                    probed[token].tolist(), probed_scores[token].tolist(), strict=True
                ):
                    rows = lists[offsets[centroid] : offsets[centroid + 1]]
                    best[rows] = value
                    pieces.append(rows)
                touched = np.concatenate(pieces)
                # duplicates in `touched` carry one value, so the buffered += adds it once per image
                total[touched] += weight[token] * (best[touched] - floor[token])
                best[touched] = -np.inf
                seen[touched] = True
            rows = np.flatnonzero(seen)
            weight_sum = max(float(weight.sum()), 1e-12)
            first = (float(weight @ floor) + total[rows]) / weight_sum
            total[rows] = 0.0
            seen[rows] = False
            _, rows = _top(first, rows, ndocs)
            # 2. centroid interaction over every token centroid of the candidates
            counts = data["counts"][rows]
            ids = data["ids"][_gather_segments(data["starts"][rows], counts)]
            if multi is None:
                second = centroid_interaction(token_scores, weight, ids, counts)
            else:  # the cosines of the candidates' cells only
                cells, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
                second = centroid_interaction(
                    _leaky(multi.cell_cosines(halves, cells), slope), weight, inverse, counts
                )
            value, rows = _top(second, rows, refine or candidates)
            # 3. refinement on the stored tokens
            if refine:
                value, rows = _top(self._refine(rows, vectors[tokens], weight, slope), rows, candidates)
            out_scores[query, : rows.size] = torch.from_numpy(value.astype(np.float32))
            out_rows[query, : rows.size] = torch.from_numpy(rows.astype(np.int64))
        return out_scores, out_rows

    def _refine(self, rows: np.ndarray, vectors: np.ndarray, weight: np.ndarray, slope: float) -> np.ndarray:
        """Exact caption-side interaction `[R]` of one query's token `vectors` `[T, d]` (weights `[T]`)
        with the first-stage tokens of `rows` `[R]`, decoded from `first_stage_codes.bin`."""
        if not self.meta.get("first_stage_codes"):
            raise ValueError(
                "refine needs the first-stage token codes, which this index does not store: build it with "
                "first_stage_codes=True or run build_first_stage_codes()"
            )
        data = self._centroids()
        if "codes" not in data:
            file = self.path / _FS_CODES_FILE
            dtype = np.dtype(_NUMPY[self.meta["codec"]])
            size = file.stat().st_size // (dtype.itemsize * self.meta["dim"]) if file.exists() else 0
            if size != data["ids"].shape[0]:
                raise ValueError(
                    f"{str(file)!r} holds {size} tokens, the centroid ids {data['ids'].shape[0]}"
                )
            data["codes"] = np.memmap(file, dtype=dtype, mode="r", shape=(size, self.meta["dim"]))
        counts = data["counts"][rows]
        tokens = data["codes"][_gather_segments(data["starts"][rows], counts)].astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", tokens, tokens)).clip(1e-12)
        return _segment_interaction(_leaky((vectors @ tokens.T) / norms, slope), weight, counts)  # cosines

    def build_first_stage_codes(self, chunk: int = 1000) -> TokenIndex:
        """Store the first-stage token codes of an index built without them, from the re-rank store (its
        fp16 keep weights choose the tokens; needs `rerank_tokens` None or >= `first_stage_tokens`), then
        save. Streams `chunk` images at a time."""
        if self.meta.get("first_stage_codes"):
            return self
        if not self.has_centroids:
            raise ValueError(
                "first-stage codes serve the centroid first stage: run build_centroid_ids() first"
            )
        limit, kept = self.meta["first_stage_tokens"], self.meta["rerank_tokens"]
        if kept is not None and (limit is None or kept < limit):
            raise ValueError(f"the store keeps {kept} tokens per image, fewer than the first stage's {limit}")
        _, counts = self._centroid_arrays()
        file = self.path / _FS_CODES_FILE
        file.unlink(missing_ok=True)
        store = self.store
        lengths_all = np.asarray(store._map("lengths"), dtype=np.int64)
        with open(file, "ab") as handle:
            for start in range(0, len(self.ids), chunk):
                rows = np.arange(start, min(start + chunk, len(self.ids)))
                lengths = lengths_all[rows]
                positions = _gather_segments(store.offsets[rows], lengths)  # every stored token of the chunk
                item = torch.from_numpy(np.repeat(np.arange(rows.size), lengths))
                slot = torch.from_numpy(positions - np.repeat(store.offsets[rows], lengths))
                width = max(int(lengths.max()), 1)
                mask = torch.zeros(rows.size, width, dtype=torch.long)
                keep = torch.zeros(rows.size, width)
                mask[item, slot] = 1
                keep[item, slot] = torch.from_numpy(
                    np.asarray(store._map("keep")[positions], dtype=np.float32)
                )
                items, chosen = select_tokens(mask, keep, limit)
                if not np.array_equal(np.bincount(items.numpy(), minlength=rows.size), counts[rows]):
                    file.unlink()
                    raise ValueError(
                        f"the store's first-stage token counts differ from the centroid ids' in rows {start}+"
                    )
                tokens = store.offsets[rows][items.numpy()] + chosen.numpy()  # the codes are copied as stored
                handle.write(np.ascontiguousarray(store._map("tokens")[tokens]).tobytes())
        self.meta["first_stage_codes"] = True
        self._centroid_cache = None
        return self.save()

    def search(
        self,
        model: Any,
        queries: GranAlignTextOutput,
        k: int = 10,
        candidates: int = 20,
        token_k: int = 256,
        search_params: str = "",
        query_tokens: int | None = None,
        pair_chunk_size: int = 1024,
        dtype: torch.dtype | None = None,
        check_model: bool = False,
        mode: str | None = None,
        nprobe: int = 2,
        ndocs: int = 256,
        refine: int | None = None,
    ) -> Any:
        """Top-k images per caption: first stage (`first_stage`, `mode` "tokens" or "centroids"), then
        the exact GRM re-rank of the candidates on the stored tokens. Returns a `search.SearchResult`."""
        from granalign.retrieval.search import SearchResult, rerank_candidates

        if not isinstance(queries, GranAlignTextOutput):
            raise ValueError("a token index of images is searched with caption queries (GranAlignTextOutput)")
        if check_model and hasattr(model, "state_dict"):
            self.check_model(model)
        config = getattr(model, "config", model)
        _, rows = self.first_stage(
            queries, max(candidates, k), token_k, search_params, config, query_tokens, mode, nprobe, ndocs,
            refine if refine is None or refine == 0 else max(refine, candidates, k),
        )  # fmt: skip
        found = rows >= 0
        unique = torch.unique(rows[found])
        local = torch.full_like(rows, -1)
        local[found] = torch.searchsorted(unique, rows[found])
        gallery = self.store.outputs(unique)
        scores, positions = rerank_candidates(
            model, gallery, queries, local, k, pair_chunk_size=pair_chunk_size, dtype=dtype
        )
        found = positions >= 0
        result_rows = torch.full_like(positions, -1)
        result_rows[found] = unique[positions[found]]
        ids = [[self.ids[int(r)] for r in query_rows if r >= 0] for query_rows in result_rows]
        return SearchResult(scores=scores, indices=result_rows, ids=ids)


# ------------------------------------------------------------------ sharded builds


def shard_range(count: int, rank: int, world: int) -> range:
    """The contiguous rows `[start, stop)` of `count` that process `rank` of `world` encodes."""
    per, extra = divmod(count, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def _concat_files(sources: Sequence[Path], target: Path) -> None:
    with open(target, "ab") as out:
        for source in sources:
            if source.exists():
                with open(source, "rb") as handle:
                    shutil.copyfileobj(handle, out, 16 << 20)


def merge_token_indices(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> TokenIndex:
    """Merge saved shard indices (same settings and trained FAISS start) into a new index at `path`, in
    shard order: files are concatenated in a stream, FAISS lists merged with shifted image rows."""
    faiss = _faiss()
    opened = [TokenIndex.open(shard) for shard in shards]
    if not opened:
        raise ValueError("nothing to merge")
    settings = ("model_fingerprint", "dim", "num_regions", "codec", "first_stage_tokens", "rerank_tokens",
                "token_codes", "centroid_dtype", "first_stage_codes")  # fmt: skip
    for shard in opened[1:]:
        for name in settings:
            if shard.meta.get(name) != opened[0].meta.get(name):
                raise ValueError(
                    f"shards disagree on {name}: {opened[0].meta.get(name)!r} vs {shard.meta.get(name)!r}"
                )
        if shard.quantizer_spec != opened[0].quantizer_spec:
            raise ValueError(
                f"shards disagree on centroid_quantizer: {opened[0].quantizer_spec!r} vs {shard.quantizer_spec!r}"
            )
        if (
            opened[0].centroid_quantizer is not None
            and (shard.path / _QUANTIZER_FILE).read_bytes() != (opened[0].path / _QUANTIZER_FILE).read_bytes()
        ):
            raise ValueError("the shards' centroid quantizers differ: build them from one trained start")
    meta = dict(opened[0].meta)
    path = Path(path)
    if (path / "meta.json").exists():
        raise FileExistsError(f"{str(path)!r} already holds a token index")
    path.mkdir(parents=True, exist_ok=True)
    merged = TokenIndex(path, meta, None)
    for name in merged.store._spec():
        _concat_files([shard.store._file(name) for shard in opened], merged.store._file(name))
    _concat_files([shard.path / "ids.txt" for shard in opened], path / "ids.txt")
    if meta.get("centroid_dtype") is not None:
        if any(not shard.has_centroids for shard in opened):
            shutil.rmtree(path)
            raise ValueError("some shards store no centroid ids: run build_centroid_ids() on them first")
        for name in _CENTROID_FILES:  # image order is shard order: the ids need no shift
            _concat_files([shard.path / name for shard in opened], path / name)
        if meta.get("first_stage_codes"):
            _concat_files([shard.path / _FS_CODES_FILE for shard in opened], path / _FS_CODES_FILE)
        meta["centroid_lists_items"] = -1
    merged.ids = (path / "ids.txt").read_text().splitlines()
    if len(set(merged.ids)) != len(merged.ids):
        shutil.rmtree(path)
        raise ValueError("the shards hold repeated image ids")
    merged._id_set = set(merged.ids)
    target = faiss.read_index(str(opened[0].path / _FAISS_FILE))
    offset = len(opened[0])
    for shard in opened[1:]:
        other = faiss.read_index(str(shard.path / _FAISS_FILE))
        if _ivf(target) is not None:  # IVF lists (inside any pre-transform): merged with shifted ids
            _ivf(target).merge_from(_ivf(other), offset)
            target.ntotal = _ivf(target).ntotal
        else:  # an IDMap around a flat or graph index: re-add the shard's vectors with shifted rows
            vectors = other.index.reconstruct_n(0, other.ntotal)
            rows = faiss.vector_to_array(other.id_map).astype(np.int64) + offset
            target.add_with_ids(vectors, rows)
        offset += len(shard)
    merged.faiss_index = target
    merged.centroid_quantizer = opened[0].centroid_quantizer
    return merged.save()


def _popped(items: list[Any]) -> Iterator[Any]:
    """The items of a list, first to last, each removed from it as it is taken."""
    while items:
        yield items.pop(0)


def _write_trained_start(
    path: Path,
    trained: Path,
    stream: Iterable[tuple[Sequence[str], GranAlignImageOutput]],
    create_kwargs: dict[str, Any],
) -> list[tuple[Sequence[str], GranAlignImageOutput]]:
    """Train the first stage of a sharded build on the first chunks of `stream` (up to `train_size`
    vectors) and write it to `trained`; returns the chunks it read (added afterwards)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = TokenIndex.create(path / "training", **create_kwargs)
    held: list[tuple[Sequence[str], GranAlignImageOutput]] = []
    if not probe._is_trained():
        collected, limit = 0, probe.meta["first_stage_tokens"]
        for ids, images in stream:
            held.append((ids, images))
            collected += len(select_tokens(images.token_mask, images.keep_weights, limit)[0])
            if collected >= probe.meta["train_size"]:
                break
        from granalign.outputs_granalign import concat_image_outputs

        probe.train_first_stage(concat_image_outputs([images for _, images in held]))
    probe.write_trained(trained)
    shutil.rmtree(path / "training")
    return held


def build_token_index_distributed(
    accelerator: Any,
    chunks: Callable[[int, int], Iterable[tuple[Sequence[str], GranAlignImageOutput]]],
    path: str | os.PathLike,
    **create_kwargs: Any,
) -> TokenIndex | None:
    """Build one index with every process of `accelerator` encoding its share.

    `chunks(rank, world)` yields this process's `(ids, image outputs)` chunks (e.g. `encode_images` of
    `shard_range(len(paths), rank, world)` in batches). The main process trains the first stage on its
    first chunks (up to `train_size` vectors, added afterwards) and shares the trained start; each
    process streams its chunks into `path/shard-<rank>`; the main process merges the shards into `path`
    and removes them. Returns the merged index on the main process, `None` elsewhere.
    """
    path = Path(path)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = path / f"shard-{rank:05d}"
    trained = path / _TRAINED_FILE
    stream = iter(chunks(rank, world))
    held: list[tuple[Sequence[str], GranAlignImageOutput]] = []
    if accelerator.is_main_process:
        held = _write_trained_start(path, trained, stream, create_kwargs)
    accelerator.wait_for_everyone()
    index = TokenIndex.create(shard, trained=trained, **create_kwargs)
    index.add_chunks(_popped(held)).add_chunks(stream).save()
    accelerator.wait_for_everyone()
    merged = None
    if accelerator.is_main_process:
        shards = [path / f"shard-{r:05d}" for r in range(world)]
        merged = merge_token_indices(shards, path / "merged")
        for item in shards:
            shutil.rmtree(item)
        trained.unlink()
        _trained_quantizer_file(trained).unlink(missing_ok=True)
        for item in (path / "merged").iterdir():
            os.replace(item, path / item.name)
        (path / "merged").rmdir()
        merged = TokenIndex.open(path)
    accelerator.wait_for_everyone()
    return merged
