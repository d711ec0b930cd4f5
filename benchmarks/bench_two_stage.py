"""Two-stage retrieval (cheap shortlist + fine-grained re-rank) against exhaustive GRM scoring.

    python benchmarks/bench_two_stage.py                              # timing on synthetic features
    python benchmarks/bench_two_stage.py --eval-matrix --images 200   # + the evaluation-matrix timing
    python benchmarks/bench_two_stage.py --no-synthetic --model runs/tiny/final \
        --dataset-arg num_train=0 --dataset-arg num_test=1000         # recall on a trained model

Timing (synthetic ViT-Base-shaped features, see `_workload.py`): text → image search of `--queries`
captions over `--images` images (top-10), and the evaluation matrix (`two_stage_scores`, union of both
directions) for `--images` images x 5 captions each: exhaustive against shortlists of `--shortlists`
items from each first stage (`--shortlist-by regions embeddings`), timed in turn within each repeat.
Recall (`--model DIR`, a saved GranAlign model; its dataset comes from the `granalign_recipe.yaml`
saved next to it, with `--dataset-arg` overrides, else `--dataset`): R@1/5/10 both ways from the
exhaustive matrix and from two-stage matrices: "search" rows take image→text from `direction="i2t"`
and text→image from `direction="t2i"` (what a two-stage search returns), "union" rows both from the
union matrix (what `two_stage_scores` gives the evaluation protocol by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import Shape, machine, scoring_model, synthetic_images, synthetic_texts, timed

from granalign.evaluation.metrics import retrieval_metrics
from granalign.evaluation.runner import caption_index
from granalign.retrieval import exhaustive_topk, two_stage_scores, two_stage_topk

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _interleaved(baseline, candidates: dict, repeats: int) -> tuple[float, dict]:
    """Median seconds of `baseline` and, per candidate, median seconds and median speed-up, timing the
    baseline and every candidate in turn within each repeat (the machine is shared: ratios are taken run
    by run)."""
    for func in (baseline, *candidates.values()):
        func()  # warm-up
    base_times, times, ratios = [], {name: [] for name in candidates}, {name: [] for name in candidates}
    for _ in range(repeats):
        base_times.append(timed(baseline, 1, warmup=0)[0])
        for name, func in candidates.items():
            times[name].append(timed(func, 1, warmup=0)[0])
            ratios[name].append(base_times[-1] / times[name][-1])
    median = statistics.median
    return median(base_times), {name: (median(times[name]), median(ratios[name])) for name in candidates}


def synthetic_timing(args: argparse.Namespace) -> None:
    shape = Shape(images=args.images, captions=5 * args.images)
    model = scoring_model(shape.dim)
    if args.image_queries:  # image -> text: image queries over the gallery's 5 captions per image
        images, queries = synthetic_texts(shape), synthetic_images(shape, count=args.queries)
        gallery = f"{shape.captions} captions (padded to {shape.caption_tokens} tokens), {args.queries} image queries"
    else:
        images, queries = synthetic_images(shape), synthetic_texts(shape, count=args.queries)
        gallery = f"{args.images} images (197 tokens, d 512), {args.queries} caption queries"
    print(
        f"\n== search timing, synthetic features: {gallery}, top-10, median of {args.repeats} interleaved runs"
    )
    candidates = {
        (source, size): (
            lambda size=size, source=source: two_stage_topk(
                model, images, queries, k=10, shortlist=size, shortlist_by=source
            )
        )
        for source in args.shortlist_by
        for size in args.shortlists
    }
    base, results = _interleaved(
        lambda: exhaustive_topk(model, images, queries, k=10), candidates, args.repeats
    )
    print(f"exhaustive: {base:.3f} s ({args.queries / base:.1f} queries/s)")
    for (source, size), (seconds, ratio) in results.items():
        print(f"two-stage by {source:10s} shortlist {size:>3}: {seconds:.3f} s, {ratio:.1f}x faster")
    if not args.eval_matrix:
        return
    texts = synthetic_texts(shape)
    print(
        f"\n== evaluation matrix timing, synthetic features: {shape.images} images x {shape.captions} captions"
    )
    candidates = {
        (source, size): (
            lambda size=size, source=source: two_stage_scores(
                model, images, texts, shortlist=size, shortlist_by=source
            )
        )
        for source in args.shortlist_by
        for size in args.shortlists
    }
    base, results = _interleaved(lambda: model.score(images, texts), candidates, 1)
    print(f"exhaustive model.score: {base:.3f} s")
    for (source, size), (seconds, ratio) in results.items():
        print(
            f"two_stage_scores by {source:10s} shortlist {size:>3} (union): {seconds:.3f} s, {ratio:.1f}x faster"
        )


def _load_split(model_dir: Path, dataset: str | None, split: str, overrides: dict):
    if dataset is None and (model_dir / "granalign_recipe.yaml").is_file():
        import yaml

        data = yaml.safe_load((model_dir / "granalign_recipe.yaml").read_text())["data"]
        source, kwargs = data["source"], dict(data.get("args") or {})
    else:
        source, kwargs = dataset or "builtin", {}
    kwargs.update(overrides)
    if source == "builtin":
        from granalign.data.synthetic import build_synthetic_scenes

        return build_synthetic_scenes(**kwargs)[split], source
    from granalign.data.loading import load_alignment_dataset

    return load_alignment_dataset(source, **kwargs)[split], source


def _recalls(metrics: dict) -> str:
    return " ".join(f"{metrics[key]:5.1f}" for key in RECALLS)


def recall_on_model(args: argparse.Namespace) -> None:
    from granalign import GranAlignModel, GranAlignProcessor
    from granalign.retrieval import encode_captions, encode_dataset_images

    model_dir = Path(args.model)
    model = GranAlignModel.from_pretrained(model_dir).eval()
    processor = GranAlignProcessor.from_pretrained(model_dir)
    overrides = dict(item.split("=", 1) for item in args.dataset_arg or [])
    overrides = {key: json.loads(value) for key, value in overrides.items()}
    split, source = _load_split(model_dir, args.dataset, args.split, overrides)
    captions, text_to_image = caption_index(split)
    images, _ = encode_dataset_images(model, processor, split, batch_size=100, progress=False)
    texts = encode_captions(model, processor, captions, batch_size=100, progress=False)
    print(
        f"\n== recall: {model_dir} on {source!r} split {args.split!r}: {len(split)} images x {len(captions)} captions"
    )
    with torch.no_grad():
        base, _ = timed(lambda: model.score(images, texts), args.repeats)
        full = model.score(images, texts)
    exhaustive = retrieval_metrics(full, text_to_image)
    header = "                  " + " ".join(
        f"{key:>5s}" for key in ("i2t@1", "i2t@5", "@10", "t2i@1", "t2i@5", "@10")
    )
    print(header)
    print(f"exhaustive        {_recalls(exhaustive)}   rsum {exhaustive['rsum']:.1f}   ({base:.3f} s)")
    results = {"exhaustive": exhaustive, "exhaustive_seconds": base, "two_stage": {}}
    for source in args.shortlist_by:
        for size in args.shortlists:

            def run(size=size, source=source, direction="union"):
                return two_stage_scores(
                    model, images, texts, shortlist=size, direction=direction, shortlist_by=source
                )

            seconds, _ = timed(run, args.repeats)
            union = retrieval_metrics(run(), text_to_image)
            i2t = retrieval_metrics(run(direction="i2t"), text_to_image)
            t2i = retrieval_metrics(run(direction="t2i"), text_to_image)
            search = {**{k: i2t[k] for k in RECALLS[:3]}, **{k: t2i[k] for k in RECALLS[3:]}}
            lost = {k: round(exhaustive[k] - search[k], 2) for k in RECALLS}
            name = f"{source[:7]} s={size:<3}"
            print(
                f"{name} search {_recalls(search)}   R@1 lost: i2t {lost['i2t_r1']:.1f}, t2i {lost['t2i_r1']:.1f}"
            )
            print(
                f"{name} union  {_recalls(union)}   rsum {union['rsum']:.1f} ({seconds:.3f} s, {base / seconds:.1f}x faster)"
            )
            results["two_stage"][f"{source}-{size}"] = {
                "search": search,
                "union": union,
                "seconds": seconds,
                "lost": lost,
            }
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="synthetic gallery size")
    parser.add_argument("--queries", type=int, default=100, help="synthetic caption queries")
    parser.add_argument(
        "--image-queries",
        action="store_true",
        help="time image -> text search (a gallery of 5 captions per image)",
    )
    parser.add_argument("--shortlists", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--shortlist-by", nargs="+", default=["regions", "embeddings"], help="first stages")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-matrix", action="store_true", help="also time the full evaluation matrix")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic timing")
    parser.add_argument("--model", help="a saved GranAlign model directory, e.g. runs/tiny/final")
    parser.add_argument(
        "--dataset", help="dataset source when the model has no saved recipe (default builtin)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--dataset-arg",
        action="append",
        metavar="KEY=JSON",
        help="override a dataset argument, e.g. num_test=1000",
    )
    parser.add_argument("--output-json", help="write the recall results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    if not args.no_synthetic:
        synthetic_timing(args)
    if args.model:
        recall_on_model(args)


if __name__ == "__main__":
    main()
