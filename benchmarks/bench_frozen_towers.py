"""Training-step time with frozen, cached towers against fine-tuning the same towers.

Builds the real-data recipe's model (EfficientNet-Lite0 + MiniLM), then times optimizer steps on the same
batches three ways: both towers frozen and read from the tower cache (what `model.freeze_*_tower` does),
only the text tower fine-tuned, and both towers fine-tuned. Prints seconds per step and the ratio.

    python benchmarks/bench_frozen_towers.py --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from granalign.training.builders import build_model, build_processor, build_train_pairs, load_recipe_splits
from granalign.training.collate import AlignmentCollator
from granalign.training.recipe import load_recipe
from granalign.training.step import ContrastiveStep
from granalign.training.tower_cache import build_split_states


def _time_steps(model, collator, pairs, batch_size: int, steps: int) -> float:
    step = ContrastiveStep(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [
        collator([pairs[i] for i in range(s * batch_size, (s + 1) * batch_size)]) for s in range(steps + 1)
    ]
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch, hardest_negative=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/openclipart-minilm.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, ["train.progress_bar=false"])
    train_split, _, _, _ = load_recipe_splits(recipe.data)
    processor = build_processor(recipe.model, train_split)
    model = build_model(recipe.model, processor.tokenizer)
    m = recipe.model
    states = build_split_states(
        model, processor, train_split, True, True, m.tower_cache_dir, m.tower_cache_dtype
    )
    pairs = build_train_pairs(recipe, train_split, processor)
    cached = _time_steps(
        model,
        AlignmentCollator(processor, "longest", states.images, states.texts),
        pairs,
        args.batch_size,
        args.steps,
    )
    print(f"frozen, cached towers: {cached:.2f} s/step", flush=True)
    pairs.load_images = True
    model.text_model.requires_grad_(True)
    text_only = _time_steps(
        model,
        AlignmentCollator(processor, "longest", states.images, None),
        pairs,
        args.batch_size,
        args.steps,
    )
    print(f"text tower fine-tuned: {text_only:.2f} s/step", flush=True)
    model.vision_model.requires_grad_(True)
    both = _time_steps(model, AlignmentCollator(processor, "longest"), pairs, args.batch_size, args.steps)
    # frozen again, and timed last too, so warm-up favours neither side
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(("vision_model.", "text_model.")))
    cached = min(cached, _time_steps(
        model, AlignmentCollator(processor, "longest", states.images, states.texts), pairs, args.batch_size, args.steps
    ))  # fmt: skip
    print(f"frozen, cached towers (again): {cached:.2f} s/step")
    print(f"both towers fine-tuned: {both:.2f} s/step ({both / cached:.1f}x)")
    print(f"FROZEN_TOWERS cached_s={cached:.3f} text_tuned_s={text_only:.3f} both_tuned_s={both:.3f}")


if __name__ == "__main__":
    main()
