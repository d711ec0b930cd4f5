"""Which engine for the multi-vector first stage? FAISS token index vs embedded vector databases with
native multi-vector MaxSim search, on the synthetic gallery of `bench_search_scale.py`.

    python benchmarks/bench_search_scale.py --gallery 10000        # first: builds the exhaustive truth
    python benchmarks/bench_multivector_engines.py --gallery 10000 --engines faiss lancedb qdrant

Every engine indexes the same first-stage vectors (each image's 32 tokens of highest keep weight, unit
norm) and returns `--candidates` images per caption query (its real tokens). Reported: build seconds,
query latency p50 / p95 (one query at a time) and recall of the exhaustive GRM top-10 among the
candidates (the exhaustive top-10 cached by `bench_search_scale.py`). Engines:

* ``faiss``: `granalign.retrieval.multivector.TokenIndex` (IVF1024,PQ64x4fs, nprobe 8, 256 hits per
  query token, keep-weighted LeakyReLU late interaction with missing-similarity imputation);
* ``lancedb``: LanceDB (embedded), a multivector column with an IVF_PQ index, cosine MaxSim;
* ``qdrant``: qdrant-client's local (embedded) mode, multivector `MAX_SIM` (local mode scans every point:
  its HNSW index lives only in the Qdrant server).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_search_scale as scale
from _workload import machine, scoring_model

from granalign.retrieval.multivector import TokenIndex, first_stage_query_tokens


def _first_stage_vectors(gallery: int, seed: int, tables: dict, tokens: int):
    for shard in range((gallery + scale.SHARD - 1) // scale.SHARD):
        count = min(scale.SHARD, gallery - shard * scale.SHARD)
        images = scale.image_shard(shard, count, seed, tables, only_tokens=tokens)
        yield shard * scale.SHARD, images


def _recall(candidates: list[list[int]], truth: torch.Tensor) -> float:
    count = min(len(candidates), truth.shape[0])
    return 100.0 * float(
        np.mean([len(set(truth[q].tolist()) & set(candidates[q])) / 10 for q in range(count)])
    )


def _truth(args, tables, queries, model) -> torch.Tensor:
    """The exhaustive GRM top-10 of the queries (full synthetic images, streamed shard by shard)."""
    from granalign.retrieval import exhaustive_topk

    best_scores, best_rows = torch.empty((args.queries, 0)), torch.empty((args.queries, 0), dtype=torch.long)
    for shard in range((args.gallery + scale.SHARD - 1) // scale.SHARD):
        count = min(scale.SHARD, args.gallery - shard * scale.SHARD)
        images = scale.image_shard(shard, count, args.seed, tables)
        scores, rows = exhaustive_topk(model, images, queries, k=10, gallery_chunk_size=scale.SHARD)
        scores, rows = (
            torch.cat([best_scores, scores], 1),
            torch.cat([best_rows, rows + shard * scale.SHARD], 1),
        )
        best_scores, position = scores.topk(min(10, scores.shape[1]), 1)
        best_rows = rows.gather(1, position)
    return best_rows


def run_faiss(args, tables, queries, model) -> tuple[float, list[float], list[list[int]]]:
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    index = TokenIndex.create(tmp / "i", model, dim=scale.DIM, num_regions=0, codec="int8", first_stage_tokens=32,
                              rerank_tokens=1, faiss_factory="IVF1024,PQ64x4fs")  # fmt: skip
    build = 0.0
    for start, images in _first_stage_vectors(args.gallery, args.seed, tables, 32):
        vectors = np.ascontiguousarray(images.tokens.reshape(-1, scale.DIM).numpy())
        rows = np.repeat(np.arange(start, start + images.tokens.shape[0]), images.tokens.shape[1])
        tic = time.perf_counter()
        index._add_first_stage(vectors, rows)
        build += time.perf_counter() - tic
    tic = time.perf_counter()
    index._flush_pending()
    build += time.perf_counter() - tic
    times, found = [], []
    for q in range(args.queries):
        query = scale._query(queries, q)
        tic = time.perf_counter()
        _, rows = index.first_stage(query, args.candidates, 256, "nprobe=8", model.config)
        times.append(time.perf_counter() - tic)
        found.append([int(r) for r in rows[0] if r >= 0])
    shutil.rmtree(tmp)
    return build, times, found


def run_lancedb(args, tables, queries, model) -> tuple[float, list[float], list[list[int]]]:
    import lancedb
    import pyarrow as pa

    tmp = tempfile.mkdtemp(dir=args.tmp)
    db = lancedb.connect(tmp)
    schema = pa.schema([("row", pa.int64()), ("vector", pa.list_(pa.list_(pa.float32(), scale.DIM)))])
    table = db.create_table("gallery", schema=schema)
    build = 0.0
    for start, images in _first_stage_vectors(args.gallery, args.seed, tables, 32):
        vectors = images.tokens.numpy()
        data = pa.table({
            "row": pa.array(np.arange(start, start + len(vectors)), pa.int64()),
            "vector": pa.array([list(v) for v in vectors], type=pa.list_(pa.list_(pa.float32(), scale.DIM))),
        })  # fmt: skip
        tic = time.perf_counter()
        table.add(data)
        build += time.perf_counter() - tic
    tic = time.perf_counter()
    table.create_index(metric="cosine", index_type="IVF_PQ", num_partitions=256, num_sub_vectors=64)
    build += time.perf_counter() - tic
    times, found = [], []
    for q in range(args.queries):
        vectors, _, _ = first_stage_query_tokens(scale._query(queries, q))
        tic = time.perf_counter()
        hits = table.search(vectors.tolist()).limit(args.candidates).select(["row", "_distance"]).to_list()
        times.append(time.perf_counter() - tic)
        found.append([int(hit["row"]) for hit in hits])
    shutil.rmtree(tmp)
    return build, times, found


def run_qdrant(args, tables, queries, model) -> tuple[float, list[float], list[list[int]]]:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection(
        "gallery",
        vectors_config=models.VectorParams(
            size=scale.DIM, distance=models.Distance.COSINE,
            multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
        ),
    )  # fmt: skip
    build = 0.0
    for start, images in _first_stage_vectors(args.gallery, args.seed, tables, 32):
        vectors = images.tokens.numpy()
        points = [models.PointStruct(id=start + i, vector=vectors[i].tolist()) for i in range(len(vectors))]
        tic = time.perf_counter()
        client.upsert("gallery", points=points)
        build += time.perf_counter() - tic
    times, found = [], []
    for q in range(args.queries):
        vectors, _, _ = first_stage_query_tokens(scale._query(queries, q))
        tic = time.perf_counter()
        hits = client.query_points("gallery", query=vectors.tolist(), limit=args.candidates).points
        times.append(time.perf_counter() - tic)
        found.append([int(hit.id) for hit in hits])
    return build, times, found


ENGINES = {"faiss": run_faiss, "lancedb": run_lancedb, "qdrant": run_qdrant}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument(
        "--exhaustive-queries", type=int, default=100, help="as in the bench_search_scale run"
    )
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="~/.cache/granalign/search_scale")
    parser.add_argument("--tmp", default=None, help="scratch directory for the engines' files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    truth_file = (
        Path(args.cache).expanduser()
        / f"exhaustive-n{args.gallery}-s{args.seed}-q{args.exhaustive_queries}.pt"
    )
    model = scoring_model(scale.DIM)
    tables = scale._tables(args.seed)
    queries, _ = scale.caption_queries(args.queries, args.gallery, args.seed, tables)
    if truth_file.exists():
        truth = torch.load(truth_file)["rows"]
    else:  # small galleries: score them exhaustively here
        truth = _truth(args, tables, queries, model) if args.gallery <= 2000 else None
    print(f"machine: {machine()}")
    print(f"gallery {args.gallery:,} images x 32 first-stage tokens, {args.queries} caption queries, "
          f"{args.candidates} candidates, {args.threads} thread(s)")  # fmt: skip
    print(
        f"{'engine':10s} {'build s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'exhaustive top-10 in candidates':>32s}"
    )
    for name in args.engines:
        build, times, found = ENGINES[name](args, tables, queries, model)
        p50, p95 = scale._percentiles(times)
        recall = f"{_recall(found, truth):.1f} %" if truth is not None else "(no truth cached)"
        print(f"{name:10s} {build:8.1f} {p50:8.1f} {p95:8.1f} {recall:>32s}", flush=True)
    print(f"machine at the end: {machine()}")


if __name__ == "__main__":
    main()
