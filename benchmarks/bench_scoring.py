"""Throughput of the chunked fine-grained kernel (`GranAlignModel.score`) on a Flickr30K-shaped workload.

    python benchmarks/bench_scoring.py                 # 1/10 scale: 100 images x 500 captions
    python benchmarks/bench_scoring.py --scale 1       # Flickr30K test: 1,000 x 5,000 (minutes on CPU)
    python benchmarks/bench_scoring.py --memory        # + peak working memory at two gallery sizes
    python benchmarks/bench_scoring.py --variants buffers,compiled   # + kernel prototypes

Prints pairs per second, the achieved matmul FLOP rate (2·(d+2) FLOPs per token pair, token and region
levels, real caption tokens only: the useful work, which both GRM and the peer schedule skip padding
for) as a share of a plain dense matmul of the same dtype and of the kernel's chunk
shape timed in the same run, and the speed-up over the SCAN/LAPS per-caption sharded schedule
(`peer_laps.py`). Figures are medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import Shape, machine, matmul_rate, scoring_model, synthetic_images, synthetic_texts
from kernel_variants import VARIANTS, chunked_levels
from peer_laps import laps_style_scores

from granalign.scoring_granalign import code_images, code_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _vm_peak_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def working_memory(model, images, texts, chunks: dict) -> tuple[float, float]:
    """Peak resident memory (MiB) added while scoring, beyond the inputs, and the output's size (MiB).

    Linux only: resets the peak RSS counter (`/proc/self/clear_refs` = 5) right before the call.
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _vm_peak_kib()
    scores = model.score(images, texts, **chunks)
    peak = _vm_peak_kib()
    output = (scores.numel() * 4 * 4) / 2**20  # [3, N, M] levels + the combined [N, M], float32
    return (peak - before) / 1024 - output, output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of 1,000 images x 5,000 captions")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="token-product precision")
    parser.add_argument("--image-chunk", type=int, default=16)
    parser.add_argument("--text-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-shard", type=int, default=100, help="LAPS shard size")
    parser.add_argument("--peer-repeats", type=int, default=1)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak working memory at this and 2x the images")
    parser.add_argument(
        "--variants", default="", help="comma-separated kernel prototypes (kernel_variants.py)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape().scaled(args.scale)
    dtype = DTYPES[args.dtype]
    chunks = {"image_chunk_size": args.image_chunk, "text_chunk_size": args.text_chunk,
              "dtype": None if dtype == torch.float32 else dtype}  # fmt: skip
    print(f"machine: {machine()}")
    print(f"workload: {shape}, chunks {args.image_chunk} images x {args.text_chunk} captions, {args.dtype}")
    model = scoring_model(shape.dim)
    images, texts = synthetic_images(shape), synthetic_texts(shape)
    real_length = float(texts.token_mask.sum(1).float().mean())
    pairs, flops = shape.images * shape.captions, shape.kernel_flops(caption_tokens=real_length)
    print(f"captions: {real_length:.1f} real tokens on average, padded to {shape.caption_tokens}; FLOPs count "
          "real tokens only")  # fmt: skip

    rows = min(args.image_chunk, shape.images) * shape.image_tokens
    cols = min(args.text_chunk, shape.captions) * shape.caption_tokens
    print(f"reference: dense matmul [{rows} x {shape.dim + 2}] @ [{shape.dim + 2} x {cols}] {args.dtype}, "
          "timed right before each kernel run (the machine is shared: rates are compared run by run)")  # fmt: skip

    def interleaved(funcs: dict, repeats: int) -> dict:
        """Per function: median seconds, median ratio of its FLOP rate to the matmul rate measured right
        before it, and its run times. The functions run in turn within each repeat."""
        results = {name: ([], []) for name in funcs}
        for _ in range(repeats):
            for name, func in funcs.items():
                reference = matmul_rate(rows, shape.dim + 2, cols, dtype, repeats=2)
                start = time.perf_counter()
                func()
                results[name][0].append(time.perf_counter() - start)
                results[name][1].append(flops / results[name][0][-1] / reference)
        median = statistics.median
        return {name: (median(times), median(ratios), times) for name, (times, ratios) in results.items()}

    def report(name: str, seconds: float, ratio: float, times: list[float]) -> None:
        print(
            f"{name}: {seconds:.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), {pairs / seconds:,.0f} pairs/s, "
            f"{flops / seconds / 1e9:.1f} GFLOP/s = {100 * ratio:.0f}% of the matmul rate"
        )

    funcs = {"granalign score": lambda: model.score(images, texts, **chunks)}
    if args.variants:
        coded_images = code_images(
            images.tokens, images.token_mask, images.keep_weights, images.region_tokens, chunks["dtype"]
        )
        coded_texts = code_texts(texts.tokens, texts.token_mask, texts.keep_weights, chunks["dtype"])
        expected = model.level_scores(images, texts, **chunks)
        for name in ["committed", *args.variants.split(",")]:
            kernel = VARIANTS[name]()

            def run(kernel=kernel):
                return chunked_levels(
                    kernel, coded_images, coded_texts, 0.1, args.image_chunk, args.text_chunk
                )

            torch.testing.assert_close(run(), expected, atol=1e-4, rtol=1e-4)  # also the warm-up
            funcs[f"kernel {name} (coded inputs)"] = run
    with torch.no_grad():
        funcs["granalign score"]()  # warm-up
        results = interleaved(funcs, args.repeats)
    for name, (seconds, ratio, times) in results.items():
        report(name, seconds, ratio, times)
    ours_seconds, ours_ratio, _ = results["granalign score"]
    if args.variants:
        base = results["kernel committed (coded inputs)"][1]
        for name in args.variants.split(","):
            print(
                f"variant {name}: {results[f'kernel {name} (coded inputs)'][1] / base:.2f}x the committed kernel's rate"
            )

    if not args.no_peer:
        weights = tuple(model.config.level_weights)
        slope = model.config.similarity_negative_slope
        peer = interleaved(
            {"peer": lambda: laps_style_scores(images, texts, weights, slope, args.peer_shard)},
            args.peer_repeats,
        )["peer"]
        report(f"SCAN/LAPS per-caption schedule (shard {args.peer_shard})", *peer)
        print(
            f"granalign vs the SCAN/LAPS schedule: {peer[0] / ours_seconds:.1f}x in wall time, "
            f"{ours_ratio / peer[1]:.1f}x in matmul-normalised rate (robust to load changes between the runs)"
        )

    if args.memory:
        for count in (shape.images, 2 * shape.images):
            gallery = synthetic_images(shape, count=count)
            with torch.no_grad():
                extra, output = working_memory(model, gallery, texts, chunks)
            coded = (
                4
                * (shape.dim + 2)
                * (count * (shape.image_tokens + shape.regions) + shape.captions * shape.caption_tokens)
            )
            print(
                f"peak working memory, {count} images x {shape.captions} captions ({count * shape.captions:,} pairs): "
                f"{extra:.0f} MiB beyond inputs and the {output:.0f} MiB of outputs, of which {coded / 2**20:.0f} MiB "
                f"is the coded copy of the inputs (per item) and {extra - coded / 2**20:.0f} MiB the chunk work space"
            )


if __name__ == "__main__":
    main()
