"""Training step time of GRM against a global-embedding dual encoder, and evaluation wall time.

    python benchmarks/bench_training.py                                   # tiny towers, full vs global
    python benchmarks/bench_training.py --steps 20 --repeats 5 --variants full global_baseline \
        no_region_prompting no_uncertainty                                # + single ablations
    python benchmarks/bench_training.py --set model.vision_config.hidden_size=256 \
        --set model.vision_config.intermediate_size=1024 --set model.text_config.hidden_size=256 \
        --set model.text_config.intermediate_size=1024 --set model.grm.embed_dim=256    # bigger towers
    python benchmarks/bench_training.py --no-train --eval-model runs/tiny/final     # evaluation only

Training (the overhead of the method): for each variant of `ablation.py` (`full` = GRM, `global_baseline` =
the same towers with every GRM part off and mean pooling, i.e. a global-embedding dual encoder) the model,
AdamW groups and LR schedule are built from `--recipe` exactly as `granalign train` builds them
(`build_model`, `build_optimizer`, `build_scheduler`, `ContrastiveStep` prepared by an `Accelerator`), and
one fixed batch (the first `train.batch_size` pairs of epoch 0 of the training split, collated by the real
`AlignmentCollator`, augmentation included) is used by every variant. A timed step is the loop's body:
forward + GRM loss, backward, gradient clipping, `optimizer.step`, `zero_grad`, `scheduler.step` and the
`loss.item()` the loop reads. Data loading is not in the step (it is the same for every variant); the time
to collate the batch is printed beside. Variants are timed in turn within each repeat (the machine is
shared) and the ratios to `global_baseline` are medians of per-repeat ratios. Activation memory is the
bytes autograd saves for backward during one step (parameters excluded); on CUDA the peak allocated
memory of a step is printed too.

The same script runs on a GPU (`--device cuda`, the default when CUDA is available); ViT-Base-shaped towers
are too slow on a 2-core CPU, so pass bigger towers with `--set` there.

Evaluation (`--eval-model DIR`, a saved model directory such as `runs/tiny/final`): wall time of
`evaluate_split` on the test split of the recipe saved beside the model (`granalign_recipe.yaml`, with
`--eval-set` overrides, e.g. `--eval-set data.args.num_test=1000`), with the recipe's eval batch size,
chunk sizes and protocol, and the same work split into image encoding (preprocessing included), caption
encoding (tokenisation included), `model.score` and the protocol's recall computation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import machine, peak_rss

from granalign import GranAlignModel, GranAlignProcessor
from granalign.configuration_granalign import ABLATION_VARIANTS
from granalign.evaluation.protocols import evaluate_protocol
from granalign.evaluation.runner import caption_index, evaluate_split
from granalign.retrieval.encode import encode_captions, encode_dataset_images
from granalign.training.builders import (
    build_model,
    build_processor,
    build_train_pairs,
    get_split,
    load_recipe_dataset,
    load_recipe_splits,
)
from granalign.training.collate import AlignmentCollator, EpochPermutationSampler
from granalign.training.optim import LRSchedule, build_optimizer, build_scheduler
from granalign.training.recipe import Recipe, load_recipe
from granalign.training.step import ContrastiveStep

MIB = 2.0**20


@dataclass
class Variant:
    """One prepared variant: its step closure and what is reported about it."""

    name: str
    step: Callable[[], float]
    parameters: int
    saved_bytes: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _switches(variant: str) -> list[str]:
    return [f"model.grm.{key}={json.dumps(value)}" for key, value in ABLATION_VARIANTS[variant].items()]


@contextlib.contextmanager
def _saved_tensor_bytes(exclude: set[int], total: list[int]) -> Iterator[None]:
    """Count the bytes of the distinct storages autograd saves for backward (storages in `exclude` skipped)."""
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in seen and pointer not in exclude:
            seen.add(pointer)
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def fixed_batch(recipe: Recipe) -> tuple[dict[str, torch.Tensor], Any, Callable[[], object], int]:
    """The first `train.batch_size` pairs of epoch 0, collated as the training loader does; the processor;
    a closure that collates that batch again (for the data-time figure); the optimizer steps per epoch."""
    train_split, _, _, _ = load_recipe_splits(recipe.data)
    processor = build_processor(recipe.model, train_split)
    pairs = build_train_pairs(recipe, train_split, processor)
    indices = list(EpochPermutationSampler(len(pairs), seed=recipe.seed))[: recipe.train.batch_size]
    collator = AlignmentCollator(processor, recipe.data.padding)

    def collate() -> dict[str, torch.Tensor]:
        return collator([pairs[i] for i in indices])

    batches = (
        len(pairs) // recipe.train.batch_size
        if recipe.data.drop_last
        else -(-len(pairs) // recipe.train.batch_size)
    )
    steps_per_epoch = max(1, -(-batches // recipe.train.gradient_accumulation_steps))
    return collate(), processor, collate, steps_per_epoch


def prepare_variant(
    name: str,
    args: argparse.Namespace,
    accelerator: Accelerator,
    batch: dict[str, torch.Tensor],
    processor: Any,
    steps_per_epoch: int,
) -> Variant:
    """Build the variant's model, optimizer and scheduler as `granalign train` does; return its step."""
    recipe = load_recipe(args.recipe, [*args.set, *_switches(name)])
    set_seed(recipe.seed)
    model = build_model(recipe.model, processor.tokenizer)
    o, t = recipe.optim, recipe.train
    optimizer = build_optimizer(model, o.lr, o.backbone_lr_multiplier, o.weight_decay, o.betas, o.eps)
    module, optimizer = accelerator.prepare(ContrastiveStep(model), optimizer)
    schedule = LRSchedule.from_recipe(o, t, steps_per_epoch)
    scheduler = build_scheduler(optimizer, schedule)
    hardest = args.hardest_negative or model.config.sum_violation_warmup_epochs <= 0
    module.train()

    def step() -> float:  # the body of the loop in granalign.training.loop.train
        with accelerator.accumulate(module):
            objective = module(batch, hardest_negative=hardest)
            accelerator.backward(objective.loss)
            if accelerator.sync_gradients and t.grad_clip is not None:
                accelerator.clip_grad_norm_(module.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return objective.loss.item()

    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    variant = Variant(name, step, parameters)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = [0]
    with _saved_tensor_bytes(exclude, counter):
        step()
    variant.saved_bytes = counter[0]
    return variant


def time_training(args: argparse.Namespace, accelerator: Accelerator) -> None:
    base = load_recipe(args.recipe, args.set)
    device = accelerator.device
    rss_before = peak_rss()
    batch, processor, collate, steps_per_epoch = fixed_batch(base)
    batch = {key: value.to(device) for key, value in batch.items()}
    variants = [
        prepare_variant(name, args, accelerator, batch, processor, steps_per_epoch) for name in args.variants
    ]
    shapes = ", ".join(f"{key} {list(value.shape)}" for key, value in batch.items() if value.dim() > 1)
    print(
        f"\n== training step: recipe {args.recipe}{' ' + ' '.join(args.set) if args.set else ''}, batch {base.train.batch_size} ({shapes}), "
        f"precision {base.train.mixed_precision}, {device}; {args.warmup} warm-up + {args.steps} timed steps "
        f"per variant per repeat, {args.repeats} interleaved repeats"
    )
    for variant in variants:
        for _ in range(args.warmup):
            variant.step()
    _sync(device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: dict[str, list[float]] = {v.name: [] for v in variants}
    data_times: list[float] = []
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]  # alternate who goes first
        for variant in order:
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                variant.step()
            _sync(device)
            times[variant.name].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                peaks[variant.name].append((torch.cuda.max_memory_allocated(device) - before) / MIB)
        start = time.perf_counter()
        collate()
        data_times.append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {1e3 * values[-1]:.1f} ms" for name, values in times.items()), flush=True)  # fmt: skip

    reference = "global_baseline" if "global_baseline" in times else variants[0].name
    median = statistics.median
    print(f"\nratio: step time / {reference} step time (median of per-repeat ratios); saved MiB: activations"
          " autograd keeps for backward" + ("; peak MiB: peak CUDA memory of a step" if device.type == "cuda" else ""))  # fmt: skip
    print(f"{'variant':26s}{'ms/step':>10s}{'steps/s':>9s}{'ratio':>11s}{'params':>11s}"
          f"{'saved MiB':>11s}" + (f"{'peak MiB':>10s}" if device.type == "cuda" else ""))  # fmt: skip
    for variant in variants:
        ms = 1e3 * median(times[variant.name])
        ratio = median(a / b for a, b in zip(times[variant.name], times[reference], strict=True))
        line = (
            f"{variant.name:26s}{ms:10.1f}{1e3 / ms:9.2f}{ratio:10.2f}x{variant.parameters / 1e6:10.2f}M"
            f"{variant.saved_bytes / MIB:11.1f}"
        )
        if device.type == "cuda":
            line += f"{median(peaks[variant.name]):10.1f}"
        print(line)
    if "full" in times and reference != "full":
        ratio = median(a / b for a, b in zip(times["full"], times[reference], strict=True))
        print(f"\nGRM step time / global dual encoder step time (median of per-repeat ratios): {ratio:.2f}x")
    print(
        f"collating the batch (data loading, not in the step): {1e3 * median(data_times):.1f} ms; "
        f"peak RSS grew by {(peak_rss() - rss_before) / MIB:.0f} MiB over this part (all variants together)"
    )


def time_evaluation(args: argparse.Namespace, accelerator: Accelerator) -> None:
    model_dir = Path(args.eval_model)
    recipe = load_recipe(model_dir / "granalign_recipe.yaml", args.eval_set)
    device = accelerator.device
    model = GranAlignModel.from_pretrained(model_dir).to(device).eval()
    processor = GranAlignProcessor.from_pretrained(model_dir)
    split_name = recipe.data.test_split or "test"
    split = get_split(load_recipe_dataset(recipe.data), split_name, "data.test_split")
    captions, text_to_image = caption_index(split)
    e = recipe.eval
    rows = range(len(split))
    print(
        f"\n== evaluation: {model_dir} on split {split_name!r} ({len(split)} images x {len(captions)} captions), "
        f"protocol {e.protocol!r}, batch {e.batch_size}, chunks {e.image_chunk_size} x {e.text_chunk_size}, "
        f"precision {accelerator.mixed_precision}, {device}; median of {args.repeats} runs (1 warm-up)"
    )

    def whole() -> dict[str, Any]:
        return evaluate_split(model, processor, split, e.protocol, e.batch_size, e.image_chunk_size,
                              e.text_chunk_size, accelerator=accelerator, progress=False)  # fmt: skip

    def parts() -> dict[str, float]:
        seconds: dict[str, float] = {}
        with torch.no_grad(), accelerator.autocast():
            start = time.perf_counter()
            images, _ = encode_dataset_images(
                model, processor, split, e.batch_size, False, output_device=None, rows=rows
            )
            _sync(device)
            seconds["encode images"] = time.perf_counter() - start
            start = time.perf_counter()
            texts = encode_captions(model, processor, captions, e.batch_size, False, output_device=None)
            _sync(device)
            seconds["encode captions"] = time.perf_counter() - start
            start = time.perf_counter()
            scores = model.score(
                images, texts, image_chunk_size=e.image_chunk_size, text_chunk_size=e.text_chunk_size
            )
            scores = scores.float().cpu()
            seconds["score (model.score)"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_protocol(scores, text_to_image, e.protocol)
        seconds["recall (protocol)"] = time.perf_counter() - start
        return seconds

    result = whole()
    parts()
    totals: list[float] = []
    split_times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        whole()
        _sync(device)
        totals.append(time.perf_counter() - start)
        for key, value in parts().items():
            split_times.setdefault(key, []).append(value)
    total = statistics.median(totals)
    print(f"evaluate_split                {total:8.3f} s   (rSum {result['metrics']['rsum']:.1f})")
    medians = {key: statistics.median(values) for key, values in split_times.items()}
    print(
        f"the same work in parts (timed separately, right after each evaluate_split; sum {sum(medians.values()):.3f} s):"
    )
    for key, seconds in medians.items():
        print(f"  {key:28s}{seconds:8.3f} s   {100 * seconds / sum(medians.values()):5.1f} % of the parts")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument(
        "--variants", nargs="+", default=["full", "global_baseline"], choices=list(ABLATION_VARIANTS)
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--hardest-negative",
        action="store_true",
        help="use the hardest-negative loss (default: what epoch 0 of the recipe uses)",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    parser.add_argument("--eval-model", help="a saved model directory to time evaluation with")
    parser.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override in the eval model's saved recipe, e.g. data.args.num_test=1000")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    precision_recipe = args.recipe if not args.no_train else None
    if precision_recipe is not None:
        precision = load_recipe(precision_recipe, args.set).train.mixed_precision
    elif args.eval_model:
        precision = load_recipe(
            Path(args.eval_model) / "granalign_recipe.yaml", args.eval_set
        ).train.mixed_precision
    else:
        parser.error("nothing to do: --no-train without --eval-model")
    accelerator = Accelerator(
        cpu=args.device == "cpu", mixed_precision=precision, gradient_accumulation_steps=1
    )
    print(f"machine: {machine()}")
    if not args.no_train:
        time_training(args, accelerator)
    if args.eval_model:
        time_evaluation(args, accelerator)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
