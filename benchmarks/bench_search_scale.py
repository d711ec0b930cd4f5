"""Search at scale: the multi-vector token index (`granalign.retrieval.multivector`) against exhaustive
GRM scoring and today's two-stage search (region-level shortlist of 20 + exact re-rank).

    python benchmarks/bench_search_scale.py --gallery 10000
    python benchmarks/bench_search_scale.py --gallery 100000
    python benchmarks/bench_search_scale.py --gallery 100000 --mode tokens   # the token-hit first stage
    python benchmarks/bench_search_scale.py --gallery 1000000 --first-stage-only
    python benchmarks/bench_search_scale.py --gallery 1000000 --replicate-from 100000   # 1M-row latency proxy
    python benchmarks/bench_search_scale.py --gallery 10000 --sweep          # first-stage settings of --mode
    python benchmarks/bench_search_scale.py --model runs/tiny-seed0/final --gallery 0   # trained model

The gallery is synthetic, ViT-B/16-shaped (197 tokens, K = 5 regions, d = 512), generated in shards
of 1,000 images from fixed seeds and streamed into the index (never held whole in memory). Tokens are
*clustered*, as real ones are (a random-Gaussian gallery has no neighbours to find): each image holds
6 concepts out of 1,024; 16-32 salient tokens (keep weight U(0.5, 1)) are noisy copies of its
concepts (cosine ~0.7 to the concept), the rest noisy copies of 512 background vectors (keep U(0, 0.6));
region tokens are its first 5 concepts. Each caption query (8-32 tokens) describes 2-4 concepts of a
target image (60 % of its tokens; the rest are noisy stop words with low keep weight).

Reported per gallery size, 2 threads (`--threads`), one query at a time:

* build: seconds spent in `TokenIndex.add` + `save` (synthesis excluded), bytes per image on disk;
* query latency p50 / p95 of the token index (first stage alone and with the exact re-rank; `--mode
  centroids`, the default: PLAID candidate generation + centroid interaction + refinement on int8
  first-stage codes, `--centroid-nprobe`, `--ndocs`, `--refine`; or `--mode tokens`: FAISS token hits,
  `--token-k`, `--nprobe`), of
  today's two-stage search (region level over the in-memory region tokens, re-rank through the same
  store) and of exhaustive scoring (fp32 features, batched: total time / queries, a lower bound);
* quality against exhaustive scoring on the first `--exhaustive-queries` queries: recall of the
  exhaustive top-10 within the first stage's candidates, R@1/5/10 of the target image, R@1 lost.

Ends with `SEARCH_SCALE gallery=<n> p50_ms=<x> p95_ms=<y> speedup_vs_two_stage=<z> r1_lost=<w>`.
Indices and exhaustive results are cached under `--cache` (default ~/.cache/granalign/search_scale).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import machine, scoring_model

from granalign import GranAlignImageOutput, GranAlignTextOutput
from granalign.retrieval import exhaustive_topk, region_topk
from granalign.retrieval.multivector import TokenIndex, select_tokens
from granalign.retrieval.search import rerank_candidates

SHARD = 1000
DIM, TOKENS, REGIONS, CAPTION = 512, 197, 5, 32
CONCEPTS, BACKGROUNDS, STOPWORDS, PER_IMAGE = 1024, 512, 64, 6
_INT8_STD = 73.9  # standard deviation of uniform integers in [-127, 127]


# ------------------------------------------------------------------ synthetic clustered features


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _tables(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 999_999])
    return {
        name: _unit(rng.standard_normal((size, DIM)).astype(np.float32))
        for name, size in (("concept", CONCEPTS), ("background", BACKGROUNDS), ("stop", STOPWORDS))
    }


def _noisy(base: np.ndarray, rho: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """Unit `base + noise` with `|noise| ≈ rho` (cosine to `base` ≈ 1/√(1 + rho²)); uniform int8 noise
    (cheap to draw) is as good as Gaussian in 512 dimensions."""
    noise = rng.integers(-127, 128, base.shape, dtype=np.int8).astype(np.float32)
    scale = np.asarray(rho, dtype=np.float32) / np.float32(_INT8_STD * np.sqrt(DIM))
    noise *= scale[..., None] if scale.ndim else scale
    noise += base
    return _unit(noise)


def _plan(shard: int, seed: int) -> dict[str, np.ndarray]:
    """What the images of one shard hold (cheap; queries read their targets' concepts from it)."""
    rng = np.random.default_rng([seed, shard])
    concepts = rng.integers(0, CONCEPTS, (SHARD, PER_IMAGE))
    salient_count = rng.integers(16, 33, SHARD)
    rank = rng.random((SHARD, TOKENS)).argsort(1).argsort(1)  # a random position order per image
    salient = rank < salient_count[:, None]
    keep = np.where(salient, rng.uniform(0.5, 1.0, (SHARD, TOKENS)), rng.uniform(0.0, 0.6, (SHARD, TOKENS)))
    token_concept = np.take_along_axis(concepts, rank % PER_IMAGE, 1)
    background = rng.integers(0, BACKGROUNDS, (SHARD, TOKENS))
    return dict(concepts=concepts, salient=salient, keep=keep.astype(np.float32), token_concept=token_concept,
                background=background)  # fmt: skip


def _combined(tables: dict) -> np.ndarray:
    if "combined" not in tables:
        tables["combined"] = np.concatenate([tables["concept"], tables["background"]])
    return tables["combined"]


def image_shard(
    shard: int, count: int, seed: int, tables: dict, only_tokens: int | None = None
) -> GranAlignImageOutput:
    """The first `count` images of shard `shard`; `only_tokens`: just each image's `only_tokens` tokens of
    highest keep weight (what the first stage indexes), for galleries too large to synthesise whole."""
    plan = {name: value[:count] for name, value in _plan(shard, seed).items()}
    rng = np.random.default_rng([seed, shard, 1])
    keep = torch.from_numpy(plan["keep"])
    mask = torch.ones(count, TOKENS, dtype=torch.long)
    if only_tokens is not None:
        items, positions = select_tokens(mask, keep, only_tokens)
        items, positions = items.view(count, -1).numpy(), positions.view(count, -1).numpy()
    else:
        items, positions = (
            np.arange(count)[:, None].repeat(TOKENS, 1),
            np.arange(TOKENS)[None].repeat(count, 0),
        )
    salient = plan["salient"][items, positions]
    # one gather from [concepts; backgrounds] (the same vectors as a background gather + salient overwrite)
    source = np.where(
        salient, plan["token_concept"][items, positions], CONCEPTS + plan["background"][items, positions]
    )
    base = _combined(tables)[source]
    tokens = _noisy(base, np.where(salient, 1.0, 1.5), rng)
    keep = keep[items, positions]
    regions = _noisy(tables["concept"][plan["concepts"][:, :REGIONS]], 0.5, rng)
    embeds = _unit((tokens * keep.numpy()[..., None]).sum(1))
    return GranAlignImageOutput(
        tokens=torch.from_numpy(tokens), token_mask=torch.ones(keep.shape, dtype=torch.long), keep_weights=keep,
        region_tokens=torch.from_numpy(regions), image_embeds=torch.from_numpy(embeds),
    )  # fmt: skip


def caption_queries(
    count: int, gallery: int, seed: int, tables: dict
) -> tuple[GranAlignTextOutput, np.ndarray]:
    """`count` caption queries, each describing 2-4 concepts of a random target image; and the targets."""
    rng = np.random.default_rng([seed, 77])
    targets = rng.integers(0, gallery, count)
    plans: dict[int, np.ndarray] = {}
    tokens = np.zeros((count, CAPTION, DIM), dtype=np.float32)
    keep = np.zeros((count, CAPTION), dtype=np.float32)
    mask = np.zeros((count, CAPTION), dtype=np.int64)
    for q, target in enumerate(targets):
        shard = int(target) // SHARD
        if shard not in plans:
            plans[shard] = _plan(shard, seed)["concepts"]
        concepts = plans[shard][int(target) % SHARD]
        length = int(rng.integers(8, CAPTION + 1))
        mentioned = rng.choice(concepts, size=int(rng.integers(2, 5)), replace=False)
        content = rng.random(length) < 0.6
        base = tables["stop"][rng.integers(0, STOPWORDS, length)]
        base[content] = tables["concept"][mentioned[np.arange(int(content.sum())) % len(mentioned)]]
        tokens[q, :length] = _noisy(base, 1.0, rng)
        keep[q, :length] = np.where(content, rng.uniform(0.5, 1.0, length), rng.uniform(0.0, 0.3, length))
        mask[q, :length] = 1
    embeds = _unit((tokens * keep[..., None]).sum(1))
    queries = GranAlignTextOutput(
        tokens=torch.from_numpy(tokens), token_mask=torch.from_numpy(mask), keep_weights=torch.from_numpy(keep),
        text_embeds=torch.from_numpy(embeds),
    )  # fmt: skip
    return queries, targets


def _query(queries: GranAlignTextOutput, q: int) -> GranAlignTextOutput:
    return GranAlignTextOutput(**{name: value[q : q + 1] for name, value in queries.items()})


# ------------------------------------------------------------------ build


def _settings_name(args: argparse.Namespace, gallery: int) -> str:
    rerank = "all" if args.rerank_tokens is None else args.rerank_tokens
    factory = args.factory.replace(",", "-")
    return f"n{gallery}-s{args.seed}-{args.codec}-fs{args.first_stage_tokens}-rr{rerank}-{factory}"


def build(args: argparse.Namespace, gallery: int, model, queries, tables) -> dict:
    """Stream the synthetic gallery into a token index (cached), computing the exhaustive top-10 of the
    first `exhaustive_queries` queries and keeping the region tokens for today's two-stage search."""
    cache = Path(args.cache).expanduser()
    directory = cache / _settings_name(args, gallery)
    truth_file = cache / f"exhaustive-n{gallery}-s{args.seed}-q{args.exhaustive_queries}.pt"
    regions_file = cache / f"regions-n{gallery}-s{args.seed}.npy"
    report_file = directory / "bench.json"
    need_truth = not truth_file.exists()
    need_index = args.rebuild or not report_file.exists()
    need_regions = not regions_file.exists()
    if need_index and directory.exists():
        shutil.rmtree(directory)
    exhaustive_queries = GranAlignTextOutput(
        **{name: value[: args.exhaustive_queries] for name, value in queries.items()}
    )
    index = None
    if need_index:
        index = TokenIndex.create(
            directory, model, dim=DIM, num_regions=REGIONS, codec=args.codec,
            first_stage_tokens=args.first_stage_tokens, rerank_tokens=args.rerank_tokens,
            faiss_factory=args.factory, train_size=args.train_size, centroids=args.centroids,
            expected_items=gallery,
        )  # fmt: skip
    regions = (
        np.lib.format.open_memmap(regions_file, "w+", np.float16, (gallery, REGIONS, DIM))
        if need_regions
        else None
    )
    best_scores = torch.empty((args.exhaustive_queries, 0))
    best_rows = torch.empty((args.exhaustive_queries, 0), dtype=torch.long)
    add_seconds = truth_seconds = 0.0
    if need_index or need_truth or need_regions:
        shards = (gallery + SHARD - 1) // SHARD
        print(f"building {directory.name}: {shards} shards of {SHARD} images", flush=True)
        for shard in range(shards):
            count = min(SHARD, gallery - shard * SHARD)
            images = image_shard(shard, count, args.seed, tables)
            start = shard * SHARD
            if index is not None:
                tic = time.perf_counter()
                index.add(images, [f"img{start + i}" for i in range(count)])
                add_seconds += time.perf_counter() - tic
            if regions is not None:
                regions[start : start + count] = images.region_tokens.numpy().astype(np.float16)
            if need_truth:
                tic = time.perf_counter()
                scores, rows = exhaustive_topk(
                    model, images, exhaustive_queries, k=10, gallery_chunk_size=SHARD
                )
                truth_seconds += time.perf_counter() - tic
                merged_scores = torch.cat([best_scores, scores], 1)
                merged_rows = torch.cat([best_rows, rows + start], 1)
                best_scores, position = merged_scores.topk(min(10, merged_scores.shape[1]), 1)
                best_rows = merged_rows.gather(1, position)
            if shard % 10 == 9:
                print(f"  {shard + 1}/{shards} shards (add {add_seconds:.0f} s, exhaustive {truth_seconds:.0f} s)",
                      flush=True)  # fmt: skip
            del images
        if regions is not None:
            regions.flush()
        if need_truth:
            torch.save({"scores": best_scores, "rows": best_rows, "seconds": truth_seconds}, truth_file)
        if index is not None:
            tic = time.perf_counter()
            index.save()
            add_seconds += time.perf_counter() - tic
            sizes = index.nbytes()
            report_file.write_text(json.dumps({"build_seconds": add_seconds, **sizes}))
    truth = torch.load(truth_file)
    report = json.loads(report_file.read_text())
    return {"directory": directory, "truth": truth, "regions_file": regions_file, **report}


# ------------------------------------------------------------------ measurements


def _percentiles(times: list[float]) -> tuple[float, float]:
    values = sorted(times)
    return 1000 * statistics.median(values), 1000 * values[
        min(len(values) - 1, round(0.95 * (len(values) - 1)))
    ]


def _recall(rows: torch.Tensor, targets: np.ndarray, k: int) -> float:
    targets = torch.as_tensor(targets)[: rows.shape[0], None]
    return 100.0 * float((rows[:, :k] == targets).any(1).float().mean())


def _timed_queries(func, count: int, warmup: int = 3) -> tuple[list[float], list]:
    for q in range(min(warmup, count)):
        func(q)
    times, results = [], []
    for q in range(count):
        tic, cpu = time.perf_counter(), time.process_time()
        results.append(func(q))
        times.append(time.perf_counter() - tic)
        CPU_TIMES.append(time.process_time() - cpu)
    return times, results


#: CPU seconds of the queries last timed (`_timed_queries`): with one thread, what the query costs on an
#: idle core; wall time on this shared machine is CPU time plus waiting for a core.
CPU_TIMES: list[float] = []


def _cpu_p50() -> float:
    value = 1000 * statistics.median(CPU_TIMES) if CPU_TIMES else float("nan")
    CPU_TIMES.clear()
    return value


def search_settings(args: argparse.Namespace) -> dict:
    if args.mode == "centroids":
        return dict(
            mode="centroids",
            candidates=args.candidates,
            nprobe=args.centroid_nprobe,
            ndocs=args.ndocs,
            refine=args.refine,
            query_tokens=args.query_tokens or None,
        )
    return dict(
        mode="tokens",
        candidates=args.candidates,
        token_k=args.token_k,
        search_params=f"nprobe={args.nprobe}",
        query_tokens=args.query_tokens or None,
    )


def _with_centroids(index: TokenIndex, args: argparse.Namespace) -> TokenIndex:
    """An index cached before centroid ids existed: read them from its FAISS lists (seconds); one cached
    with another centroid quantizer than `--centroids` resolves to: re-assigned (`assign_centroids`)."""
    if args.mode == "centroids" and not index.has_centroids:
        tic = time.perf_counter()
        index.build_centroid_ids()
        print(f"centroid ids read from the FAISS lists in {time.perf_counter() - tic:.1f} s", flush=True)
    if args.mode == "centroids" and args.refine and not index.meta.get("first_stage_codes"):
        tic = time.perf_counter()
        index.build_first_stage_codes()
        print(f"first-stage codes read from the store in {time.perf_counter() - tic:.1f} s", flush=True)
    if args.mode == "centroids":
        spec = _resolved_centroids(args, len(index))
        if index.quantizer_spec != spec:
            tic = time.perf_counter()
            index.assign_centroids(spec)
            print(f"centroid quantizer {spec} trained and assigned from the first-stage codes in "
                  f"{time.perf_counter() - tic:.1f} s", flush=True)  # fmt: skip
    return index


def _resolved_centroids(args: argparse.Namespace, gallery: int) -> str | None:
    """What `--centroids` means for a gallery of this size and `--factory`."""
    import faiss

    from granalign.retrieval.multivector import resolve_centroids

    probe = faiss.index_factory(DIM, args.factory, faiss.METRIC_INNER_PRODUCT)
    try:
        nlist = faiss.extract_index_ivf(probe).nlist
    except RuntimeError:
        nlist = None
    return resolve_centroids(args.centroids, gallery, args.first_stage_tokens, nlist)


def measure(args: argparse.Namespace, gallery: int) -> dict:
    model = scoring_model(DIM)
    tables = _tables(args.seed)
    queries, targets = caption_queries(args.queries, gallery, args.seed, tables)
    built = build(args, gallery, model, queries, tables)
    index = _with_centroids(TokenIndex.open(built["directory"]), args)
    centroid_bytes = index.nbytes()["centroids"]
    truth, nq = built["truth"], args.exhaustive_queries
    config = model.config
    settings = search_settings(args)
    print(
        f"\n== gallery {gallery:,} images: index {built['directory'].name}, built in {built['build_seconds']:.0f} s "
        f"(add + save, synthesis excluded); store {built['store'] / gallery / 1024:.1f} KiB/image, first stage "
        f"{built['first_stage'] / gallery:.0f} B/image, centroid ids + lists {centroid_bytes / gallery:.0f} B/image, "
        f"first-stage codes {index.nbytes()['first_stage_codes'] / gallery:.0f} B/image; "
        f"search {settings}",
        flush=True,
    )

    if args.sweep:
        sweep(args, index, queries, targets, truth, config)

    def first(q):
        return index.first_stage(_query(queries, q), config=config, **{k: v for k, v in settings.items()})

    def full(q):
        return index.search(model, _query(queries, q), k=10, **settings)

    first_times, first_results = _timed_queries(first, args.queries)
    first_cpu = _cpu_p50()
    full_times, full_results = _timed_queries(full, args.queries)
    full_cpu = _cpu_p50()
    candidates = torch.cat([rows for _, rows in first_results])
    new_rows = torch.cat([result.indices for result in full_results])
    # today's two-stage: region level over the (in-memory) region tokens, re-rank of 20 through the store
    regions = torch.from_numpy(np.load(built["regions_file"], mmap_mode="r")[:].astype(np.float32))
    region_gallery = GranAlignImageOutput(
        tokens=torch.zeros(gallery, 1, 1).expand(gallery, 1, 1), token_mask=torch.ones(gallery, 1, dtype=torch.long),
        keep_weights=torch.ones(gallery, 1), region_tokens=regions, image_embeds=torch.zeros(gallery, 1),
    )  # fmt: skip

    def two_stage(q):
        query = _query(queries, q)
        _, shortlist = region_topk(model, region_gallery, query, 20, gallery_chunk_size=16384)
        unique = torch.unique(shortlist)
        local = torch.searchsorted(unique, shortlist)
        _, position = rerank_candidates(model, index.store.outputs(unique), query, local, 10)
        return unique[position]

    two_count = min(args.queries, args.two_stage_queries)
    two_times, two_results = _timed_queries(two_stage, two_count, warmup=1)
    two_cpu = _cpu_p50()
    two_rows = torch.cat(two_results)
    exhaustive_ms = 1000 * truth["seconds"] / nq
    truth_rows = truth["rows"]
    shortlist_recall = float(
        np.mean([len(set(truth_rows[q].tolist()) & set(candidates[q].tolist())) / 10 for q in range(nq)])
    )
    top1_in = float(np.mean([int(truth_rows[q, 0]) in set(candidates[q].tolist()) for q in range(nq)]))
    agree = float((new_rows[:nq, 0] == truth_rows[:, 0]).float().mean())
    r = {name: [_recall(rows[:nq], targets, k) for k in (1, 5, 10)] for name, rows in
         (("exhaustive", truth_rows), ("token index", new_rows), ("two-stage", two_rows))}  # fmt: skip
    r_all = [_recall(new_rows, targets, k) for k in (1, 5, 10)]
    target_in = 100.0 * float(
        np.mean([int(targets[q]) in set(candidates[q].tolist()) for q in range(args.queries)])
    )
    fp50, fp95 = _percentiles(first_times)
    np50, np95 = _percentiles(full_times)
    tp50, tp95 = _percentiles(two_times)
    exhaustive_two = "/".join(f"{_recall(truth_rows[:two_count], targets, k):.0f}" for k in (1, 5, 10))
    print(
        f"{'method':34s} {'p50 ms':>8s} {'p95 ms':>8s} {'cpu p50':>8s}   R@1/5/10 of the target "
        f"(first {nq} queries; exhaustive on the two-stage ones: {exhaustive_two})"
    )
    rows_out = (
        ("exhaustive (batched, per query)", exhaustive_ms, exhaustive_ms, float("nan"), r["exhaustive"], ""),
        ("two-stage regions s=20 (today)", tp50, tp95, two_cpu, r["two-stage"], f"  (first {two_count} queries)"),
        (f"token index ({args.mode}): first stage", fp50, fp95, first_cpu, None, ""),
        (f"token index ({args.mode}) + re-rank", np50, np95, full_cpu, r["token index"],
         f"; all {args.queries} queries " + "/".join(f"{x:.0f}" for x in r_all)),
    )  # fmt: skip
    for name, p50, p95, cpu, recalls, note in rows_out:
        recall = "/".join(f"{x:.0f}" for x in recalls) if recalls else ""
        print(f"{name:34s} {p50:8.1f} {p95:8.1f} {cpu:8.1f}   {recall}{note}")
    print(
        f"first stage vs exhaustive ({nq} queries): recall of the exhaustive top-10 in the {args.candidates} "
        f"candidates {100 * shortlist_recall:.1f} %, exhaustive top-1 among them {100 * top1_in:.0f} %, "
        f"same top-1 after re-rank {100 * agree:.0f} %; target among candidates (all queries) {target_in:.0f} %"
    )
    r1_lost = r["exhaustive"][0] - r["token index"][0]
    print(f"first stage shortlist recall {100 * shortlist_recall:.1f} %  (mode {args.mode})")
    return dict(gallery=gallery, p50=np50, p95=np95, speedup=tp50 / np50, r1_lost=r1_lost, first_p50=fp50,
                cpu_p50=full_cpu, two_cpu_p50=two_cpu,
                first_p95=fp95, two_p50=tp50, exhaustive_ms=exhaustive_ms, shortlist_recall=shortlist_recall,
                build_seconds=built["build_seconds"], store=built["store"], first_stage=built["first_stage"])  # fmt: skip


def sweep(args: argparse.Namespace, index: TokenIndex, queries, targets, truth, config) -> None:
    """First-stage latency and recall of the exhaustive top-10 / top-1 (and the target) over a grid of
    search settings of `--mode`."""
    nq = args.exhaustive_queries
    if args.mode == "centroids":
        grid = [dict(mode="centroids", nprobe=nprobe, ndocs=ndocs, refine=refine, candidates=candidates)
                for nprobe in (1, 2, 4, 8) for ndocs in (64, 256, 1024) for refine in (0, 64)
                for candidates in (10, 20) if ndocs >= refine]  # fmt: skip
    else:
        grid = [dict(mode="tokens", candidates=candidates, token_k=token_k, search_params=f"nprobe={nprobe}")
                for nprobe in (4, 8, 16, 32) for token_k in (32, 64, 128) for candidates in (20, 32, 64)]  # fmt: skip
    print(
        f"{'settings':58s} {'p50 ms':>7s} {'p95 ms':>7s} {'top-10 in':>9s} {'top-1 in':>8s} {'target in':>9s}"
    )
    for settings in grid:
        settings = dict(settings, query_tokens=args.query_tokens or None)
        times, results = _timed_queries(
            lambda q, settings=settings: index.first_stage(_query(queries, q), config=config, **settings),
            nq, warmup=1,
        )  # fmt: skip
        CPU_TIMES.clear()
        rows = torch.cat([r for _, r in results])
        top10 = np.mean([len(set(truth["rows"][q].tolist()) & set(rows[q].tolist())) / 10 for q in range(nq)])
        top1 = np.mean([int(truth["rows"][q, 0]) in set(rows[q].tolist()) for q in range(nq)])
        target = np.mean([int(targets[q]) in set(rows[q].tolist()) for q in range(nq)])
        p50, p95 = _percentiles(times)
        name = " ".join(f"{k}={v}" for k, v in settings.items() if k not in ("mode", "query_tokens"))
        print(f"{name:58s} {p50:7.1f} {p95:7.1f} {100 * top10:8.1f}% {100 * top1:7.0f}% {100 * target:8.0f}%",
              flush=True)  # fmt: skip


def _tune_malloc() -> None:
    """Keep freed buffers in the heap (glibc `M_MMAP_THRESHOLD` / `M_TRIM_THRESHOLD` raised), so the
    per-query tensors of a few MB are reused instead of mapped, page-faulted and unmapped every time (the
    usual CPU-inference tuning, as with jemalloc / tcmalloc). `--no-malloc-tuning` turns it off."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD


def first_stage_only(args: argparse.Namespace, gallery: int) -> dict:
    """Build and time the first stage alone (the re-rank store of a 1M gallery does not fit this disk)."""
    model = scoring_model(DIM)
    tables = _tables(args.seed)
    queries, targets = caption_queries(args.queries, gallery, args.seed, tables)
    centroids_only = args.mode == "centroids"  # the centroid first stage needs no token codes in FAISS
    prefix = "firststage-centroids-" if centroids_only else "firststage-"
    spec = _resolved_centroids(args, gallery) if centroids_only else None
    suffix = "" if spec in (None, "ivf") else f"-{spec}"  # the IVF-quantizer build keeps its old name
    directory = Path(args.cache).expanduser() / (prefix + _settings_name(args, gallery) + suffix)
    if centroids_only and args.refine:
        print("--first-stage-only stores no first-stage codes (16 GB at 1M): timing without --refine")
        args.refine = 0
    if args.rebuild or not (directory / "bench.json").exists():
        if directory.exists():
            shutil.rmtree(directory)
        index = TokenIndex.create(
            directory, model, dim=DIM, num_regions=0, codec="int8", first_stage_tokens=args.first_stage_tokens,
            rerank_tokens=1, faiss_factory=args.factory, train_size=args.train_size,
            token_codes=not centroids_only, first_stage_codes=False,
            centroids=spec if centroids_only else args.centroids, expected_items=gallery,
        )  # fmt: skip
        seconds = synthesis = 0.0
        cpu = time.process_time()
        shards = (gallery + SHARD - 1) // SHARD
        print(f"building {directory.name}: {shards} shards of {SHARD} images, centroids {spec}", flush=True)
        for shard in range(shards):  # one shard's first-stage tokens in memory at a time
            count = min(SHARD, gallery - shard * SHARD)
            tic = time.perf_counter()
            images = image_shard(shard, count, args.seed, tables, only_tokens=args.first_stage_tokens)
            vectors = images.tokens.reshape(-1, DIM).numpy()
            rows = np.repeat(np.arange(shard * SHARD, shard * SHARD + count), images.tokens.shape[1])
            synthesis += time.perf_counter() - tic
            tic = time.perf_counter()
            if index.has_centroids:
                index._append_centroid_counts(np.full(count, images.tokens.shape[1]))
            index._add_first_stage(np.ascontiguousarray(vectors), rows)  # the FAISS half of `add`
            seconds += time.perf_counter() - tic
            if shard % 50 == 49 or shard == shards - 1:
                print(f"  {shard + 1}/{shards} shards: synthesis {synthesis:.0f} s, train + assign + write "
                      f"{seconds:.0f} s (wall), {time.process_time() - cpu:.0f} s CPU in all", flush=True)  # fmt: skip
        index._flush_pending()
        index.ids = [f"img{i}" for i in range(gallery)]
        tic = time.perf_counter()
        index.save()
        seconds += time.perf_counter() - tic
        print(f"  saved (centroid lists) in {time.perf_counter() - tic:.0f} s; build CPU "
              f"{time.process_time() - cpu:.0f} s", flush=True)  # fmt: skip
        report = {
            "build_seconds": seconds,
            "synthesis_seconds": synthesis,
            "build_cpu_seconds": time.process_time() - cpu,
        }
        (directory / "bench.json").write_text(json.dumps({**report, **index.nbytes()}))
        del index
    report = json.loads((directory / "bench.json").read_text())
    index = _open_first_stage(directory)
    settings = search_settings(args)
    times, results = _timed_queries(
        lambda q: index.first_stage(_query(queries, q), config=model.config, **settings), args.queries
    )
    candidates = torch.cat([rows for _, rows in results])
    target_in = 100.0 * float(
        np.mean([int(targets[q]) in set(candidates[q].tolist()) for q in range(args.queries)])
    )
    p50, p95 = _percentiles(times)
    cpu = _cpu_p50()
    stored = report["first_stage"] + report.get("centroids", 0)
    print(
        f"\n== first stage only, gallery {gallery:,}: {args.factory} over {args.first_stage_tokens} tokens/image, "
        f"built in {report['build_seconds']:.0f} s (FAISS train + add + save), {stored / gallery:.0f} "
        f"B/image ({'centroid ids + lists + quantizer' if centroids_only else 'FAISS'}); {settings}: p50 "
        f"{p50:.1f} ms, p95 {p95:.1f} ms, cpu p50 {cpu:.1f} ms; target among the {args.candidates} candidates "
        f"{target_in:.0f} %"
    )
    return dict(gallery=gallery, first_p50=p50, first_p95=p95, target_in=target_in, **report)


def replicated_first_stage(args: argparse.Namespace, gallery: int) -> dict:
    """Time the centroid first stage on `gallery` rows made of `gallery / base` copies of the cached
    `--replicate-from` gallery's centroid ids (lists `gallery / base` times as long as the base's): a
    latency proxy for a gallery too slow to synthesise here. Copies tie, so recall is of any copy."""
    import faiss

    base = args.replicate_from
    if gallery % base:
        raise SystemExit(f"--gallery {gallery} must be a multiple of --replicate-from {base}")
    source = TokenIndex.open(Path(args.cache).expanduser() / _settings_name(args, base))
    source.build_centroid_ids()
    directory = Path(args.cache).expanduser() / f"replica-{gallery // base}x-{_settings_name(args, base)}"
    copies = gallery // base
    if args.rebuild or not (directory / "meta.json").exists():
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        for name in ("centroids.bin", "centroid_counts.bin"):
            data = (source.path / name).read_bytes()
            with open(directory / name, "wb") as handle:
                for _ in range(copies):
                    handle.write(data)
        shutil.copy(source.path / "first_stage.faiss", directory / "first_stage.faiss")
        meta = dict(source.meta, num_items=gallery, centroid_lists_items=-1, first_stage_codes=False)
        (directory / "meta.json").write_text(json.dumps(meta))
        index = TokenIndex(directory, meta, faiss.read_index(str(directory / "first_stage.faiss")))
        index.ids = [f"img{i}" for i in range(gallery)]
        tic = time.perf_counter()
        index._write_centroid_lists()
        index._write_meta()
        print(f"replicated {copies} x {base:,}: centroid lists built in {time.perf_counter() - tic:.1f} s")
    index = _open_first_stage(directory)
    model = scoring_model(DIM)
    queries, targets = caption_queries(args.queries, base, args.seed, _tables(args.seed))
    settings = dict(search_settings(args), refine=0)
    times, results = _timed_queries(
        lambda q: index.first_stage(_query(queries, q), config=model.config, **settings), args.queries
    )
    cpu = _cpu_p50()
    candidates = torch.cat([rows for _, rows in results]) % base
    target_in = 100.0 * float(
        np.mean([int(targets[q]) in set(candidates[q].tolist()) for q in range(args.queries)])
    )
    p50, p95 = _percentiles(times)
    size = index.nbytes()["centroids"]
    print(
        f"\n== centroid first stage on {gallery:,} rows ({copies} copies of the {base:,} gallery's centroid ids; "
        f"centroid ids + lists {size / gallery:.0f} B/image); {settings}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
        f"cpu p50 {cpu:.1f} ms; a copy of the target among the {args.candidates} candidates {target_in:.0f} %"
    )
    return dict(gallery=gallery, first_p50=p50, first_p95=p95, target_in=target_in)


def _open_first_stage(directory: Path) -> TokenIndex:
    """A first-stage-only index (no store rows): open its FAISS part."""
    import faiss

    meta = json.loads((directory / "meta.json").read_text())
    index = TokenIndex(directory, meta, faiss.read_index(str(directory / "first_stage.faiss")))
    if index.quantizer_spec not in (None, "ivf"):
        index.centroid_quantizer = faiss.read_index(str(directory / "centroid_quantizer.faiss"))
    index.ids = [f"img{i}" for i in range(meta["num_items"])]
    return index


def trained_model(args: argparse.Namespace) -> None:
    """R@1/5/10 (text → image) lost against exhaustive scoring on a trained model's test split."""
    import tempfile

    from bench_two_stage import _load_split

    from granalign import GranAlignModel, GranAlignProcessor
    from granalign.evaluation.metrics import retrieval_metrics
    from granalign.evaluation.runner import caption_index
    from granalign.retrieval import encode_captions, encode_dataset_images

    model_dir = Path(args.model)
    model = GranAlignModel.from_pretrained(model_dir).eval()
    processor = GranAlignProcessor.from_pretrained(model_dir)
    split, source = _load_split(model_dir, None, "test", {})
    captions, text_to_image = caption_index(split)
    images, _ = encode_dataset_images(model, processor, split, batch_size=100, progress=False)
    texts = encode_captions(model, processor, captions, batch_size=100, progress=False)
    with torch.no_grad():
        full = model.score(images, texts)
    exhaustive = retrieval_metrics(full, text_to_image)
    num_images, dim = images.tokens.shape[0], images.tokens.shape[-1]
    regions = 0 if images.region_tokens is None else images.region_tokens.shape[1]
    print(f"\n== trained model {model_dir} on {source!r} test: {num_images} images x {len(captions)} captions, "
          f"{images.tokens.shape[1]} image tokens, d {dim}; text -> image R@1/5/10")  # fmt: skip
    print(
        f"exhaustive: {exhaustive['t2i_r1']:.1f} / {exhaustive['t2i_r5']:.1f} / {exhaustive['t2i_r10']:.1f}"
    )
    for codec, first_tokens, rerank_tokens, candidates in (
        ("float16", None, None, 20), ("float16", 8, None, 20), ("int8", 8, None, 20), ("int8", 8, 8, 20),
        ("int8", 4, None, 20), ("int8", 8, None, 50),
    ):  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            index = TokenIndex.create(
                Path(tmp) / "index", model, dim=dim, num_regions=regions, codec=codec,
                first_stage_tokens=first_tokens, rerank_tokens=rerank_tokens, faiss_factory="IVF16,Flat",
            )  # fmt: skip
            index.add(images, [str(i) for i in range(num_images)]).save()
            results = {
                "tokens (IVF16,Flat nprobe 4, token_k 32)": index.search(
                    model, texts, k=num_images, candidates=candidates, mode="tokens", token_k=32,
                    search_params="nprobe=4",
                ),
                "centroids (nprobe 2 of 16, ndocs 256, refine 64)": index.search(
                    model, texts, k=num_images, candidates=candidates, mode="centroids", nprobe=2, ndocs=256,
                    refine=64,
                ),
            }  # fmt: skip
        for name, result in results.items():
            matrix = torch.full((num_images, len(captions)), -torch.inf)
            for q in range(len(captions)):
                found = result.indices[q] >= 0
                matrix[result.indices[q][found], q] = result.scores[q][found]
            metrics = retrieval_metrics(matrix, text_to_image)
            lost = [exhaustive[f"t2i_r{k}"] - metrics[f"t2i_r{k}"] for k in (1, 5, 10)]
            print(f"token index {codec:7s} first-stage tokens {first_tokens or 'all'}, re-rank tokens "
                  f"{rerank_tokens or 'all'}, {candidates} candidates, {name}: "
                  f"{metrics['t2i_r1']:.1f} / {metrics['t2i_r5']:.1f} / {metrics['t2i_r10']:.1f}, lost "
                  f"{' / '.join(f'{x:.1f}' for x in lost)}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, nargs="+", default=[10000], help="gallery sizes (0: none)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--exhaustive-queries", type=int, help="queries scored exhaustively (default: 100 up "
                        "to 20k images, else 30)")  # fmt: skip
    parser.add_argument(
        "--two-stage-queries", type=int, default=30, help="queries timed for today's two-stage"
    )
    parser.add_argument("--codec", default="int8", choices=("float32", "float16", "int8"))
    parser.add_argument("--first-stage-tokens", type=int, default=32)
    parser.add_argument("--rerank-tokens", type=int, default=None)
    parser.add_argument(
        "--factory", default="IVF1024,PQ64x4fs", help="FAISS index_factory of the first stage"
    )
    parser.add_argument("--train-size", type=int, default=131_072)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--token-k", type=int, default=4096)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument(
        "--mode", default="centroids", choices=("tokens", "centroids"),
        help="first stage: FAISS token hits (token_k) or PLAID centroid interaction (nprobe, ndocs, refine)",
    )  # fmt: skip
    parser.add_argument("--centroid-nprobe", type=int, default=2, help="centroids probed per caption token")
    parser.add_argument(
        "--centroids", default="auto",
        help="centroid quantizer: auto (TokenIndex.create's rule: ivf, or IMI2x8 once PLAID's cell count "
        "reaches 65,536, ~524k images), ivf (the --factory's IVF quantizer, nlist fixed) or IMI2x<b> (4^b cells)",
    )  # fmt: skip
    parser.add_argument(
        "--ndocs", type=int, default=256, help="candidates scored by full centroid interaction"
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=64,
        help="centroid-interaction top re-scored on the int8 first-stage codes (0: off; --first-stage-only: 0)",
    )
    parser.add_argument(
        "--query-tokens", type=int, default=8, help="caption tokens searched (highest keep weight; 0: all)"
    )
    parser.add_argument("--first-stage-only", action="store_true", help="time the first stage alone (1M)")
    parser.add_argument(
        "--replicate-from", type=int, default=0,
        help="time the centroid first stage on --gallery rows copied from this cached gallery (latency proxy)",
    )  # fmt: skip
    parser.add_argument("--model", help="also measure R@1/5/10 lost on a trained model, e.g. runs/tiny/final")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="first-stage settings grid before the run")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--cache", default="~/.cache/granalign/search_scale")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:  # numpy's BLAS too: its default thread pool spins on a loaded machine (19 -> 4 ms CPU per query)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        print("threadpoolctl not installed: numpy's BLAS threads are not limited (set OPENBLAS_NUM_THREADS)")
    if not args.no_malloc_tuning:
        _tune_malloc()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    Path(args.cache).expanduser().mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    results = []
    for gallery in [g for g in args.gallery if g > 0]:
        if args.exhaustive_queries is None:
            args.exhaustive_queries = 100 if gallery <= 20_000 else 30
        args.exhaustive_queries = min(args.exhaustive_queries, args.queries)
        if args.replicate_from:
            results.append(replicated_first_stage(args, gallery))
        else:
            results.append(
                first_stage_only(args, gallery) if args.first_stage_only else measure(args, gallery)
            )
    if args.model:
        trained_model(args)
    print(f"\nmachine at the end: {machine()}")
    for result in results:
        if "p50" in result:
            print(f"gallery={result['gallery']}: CPU time per query p50 (1 thread: an idle core's latency) "
                  f"token index {result['cpu_p50']:.1f} ms, two-stage {result['two_cpu_p50']:.1f} ms")  # fmt: skip
    for result in results:
        if "p50" in result:
            print(f"SEARCH_SCALE gallery={result['gallery']} p50_ms={result['p50']:.1f} p95_ms={result['p95']:.1f} "
                  f"speedup_vs_two_stage={result['speedup']:.1f} r1_lost={result['r1_lost']:.1f}")  # fmt: skip
        else:
            print(f"SEARCH_SCALE gallery={result['gallery']} first_stage_only p50_ms={result['first_p50']:.1f} "
                  f"p95_ms={result['first_p95']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
