"""Fast retrieval over large galleries: encode once, store token-level features, search many times.

Because GRM's image branch never sees the caption, a gallery is encoded once (`encode`), stored with the
model revision that encoded it (`GalleryIndex`), and searched either exhaustively with the chunked
fine-grained kernel or in two stages: a cheap shortlist (`shortlist`: the region level of GRM, or the
global embeddings with exact matmul / FAISS) re-ranked by the fine-grained score of the shortlisted
pairs only (`rerank`). `two_stage_scores` (`matrix`) is the same engine as a full score matrix for
the evaluation protocol. For galleries too large to scan, `TokenIndex` (`multivector`) keeps the tokens
on disk (int8 / fp16, memory-mapped) and shortlists from token-level IVF centroids (PLAID-style candidate
generation and centroid interaction, the default) or FAISS token hits before the same exact re-rank.

Example:
```python
>>> from granalign.retrieval import GalleryIndex, encode_captions, encode_images, search
>>> index = GalleryIndex.build(model, encode_images(model, processor, paths), ids=paths)
>>> index.save("gallery.safetensors")
>>> queries = encode_captions(model, processor, ["a red circle left of a blue square"])
>>> search(model, index, queries, k=5).ids
```
"""

from granalign.retrieval.encode import (
    encode_captions,
    encode_dataset_images,
    encode_image_states,
    encode_images,
    encode_regions,
    list_image_files,
)
from granalign.retrieval.fingerprint import model_fingerprint, model_revision
from granalign.retrieval.index import FEATURE_VERSION, GalleryIndex
from granalign.retrieval.matrix import shortlist_pairs, two_stage_scores
from granalign.retrieval.multivector import TokenIndex, build_token_index_distributed, merge_token_indices
from granalign.retrieval.rerank import pair_level_scores, pair_scores
from granalign.retrieval.search import (
    DEFAULT_IMAGE_QUERY_SHORTLIST,
    DEFAULT_SHORTLIST,
    SearchResult,
    default_shortlist,
    exhaustive_topk,
    region_topk,
    rerank_candidates,
    search,
    two_stage_topk,
)
from granalign.retrieval.shortlist import EmbeddingShortlist, exact_topk, faiss_available, region_level_scores

__all__ = [
    "DEFAULT_IMAGE_QUERY_SHORTLIST",
    "DEFAULT_SHORTLIST",
    "FEATURE_VERSION",
    "EmbeddingShortlist",
    "GalleryIndex",
    "SearchResult",
    "TokenIndex",
    "build_token_index_distributed",
    "default_shortlist",
    "encode_captions",
    "encode_dataset_images",
    "encode_image_states",
    "encode_images",
    "encode_regions",
    "exact_topk",
    "exhaustive_topk",
    "faiss_available",
    "list_image_files",
    "merge_token_indices",
    "model_fingerprint",
    "model_revision",
    "pair_level_scores",
    "pair_scores",
    "region_level_scores",
    "region_topk",
    "rerank_candidates",
    "search",
    "shortlist_pairs",
    "two_stage_scores",
    "two_stage_topk",
]
