"""GRM on real data: the openclipart benchmark with pretrained frozen towers, against two global baselines.

On the held-out openclipart test split (captions never seen in training), for each seed:
- every variant of `ABLATION_VARIANTS` trained by our own trainer with the real-data recipe (full GRM,
  each part switched off, and `global_baseline`: the same towers as a global dual encoder, same budget);
- the simple frozen-feature baseline a user would write first: the mean-pooled CNN feature and the
  MiniLM sentence embedding (mean of its token states), one linear layer each, symmetric InfoNCE with a
  learnable temperature (initialised at 0.07), AdamW lr 1e-3, early stopping on dev rSum.
All of them read the same cached tower outputs, so the towers run once for the whole benchmark.

    python benchmarks/real_data.py                                   # 6 variants + simple, 3 seeds
    python benchmarks/real_data.py --seeds 0 --variants full global_baseline --set train.epochs=5
    python benchmarks/real_data.py --split-seeds 1 2 3 4 --seeds 0 --variants full global_baseline
    python benchmarks/real_data.py --folds 0 1 2 3 4 5 6 7 8 9 --seeds 0 --variants full global_baseline
    python benchmarks/real_data.py --recipe configs/openmoji-minilm.yaml --folds 0 1 --seeds 0 \
        --variants full global_baseline    # the OpenMoji emoji (compositional captions), same towers

One split holds only about 300 test images, which are worth about +-13 rSum on their own: `--split-seeds`
repeats the benchmark on other caption -> split hashes (`data.args.split_seed`), and the summary then
also gives each variant's paired difference to full GRM, split by split, as mean +- std over splits.
`--folds` is 10-fold cross-validation instead (`data.args.fold`): the captions fall into 10 hash buckets,
fold k tests on bucket k and selects on bucket k+1, so the folds' test splits are disjoint and together
test every caption once; the tower outputs are cached per item, so every fold reuses them. With more
than one split the summary also gives each training seed's mean over all of them (with every fold, its
cross-validated score), then mean +- std over seeds and whether that spread is apart from full GRM's.

Prints the table (strict standard protocol, and with identical captions counted correct) and ends with
`REAL_DATA grm_rsum=<mean> global_rsum=<mean> simple_rsum=<mean> minutes_per_run=<mean>`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from ablation import run_variant
from torch import nn

from granalign.configuration_granalign import ABLATION_VARIANTS
from granalign.data.captions import caption_ids
from granalign.evaluation.metrics import retrieval_metrics, retrieval_metrics_identical_captions
from granalign.evaluation.runner import caption_index
from granalign.losses_granalign import infonce_loss, positive_pair_mask
from granalign.training.builders import build_model, build_processor, load_recipe_splits
from granalign.training.recipe import load_recipe
from granalign.training.tower_cache import SplitStates, build_split_states

REPORTED = ("dev_rsum", "rsum", "identical_rsum", "i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10", "wall_s")


# ----------------------------------------------------------------------------- the simple baseline
def _pooled(states: SplitStates) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled image features `[N_img, h_v]` and caption sentence embeddings `[N_txt, h_t]`."""
    images, _ = states.images.batch(range(len(states.images)))
    texts, mask = states.texts.batch(range(len(states.texts)))
    sentence = (texts * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return images.mean(1), nn.functional.normalize(sentence, dim=-1)


class SimpleDualEncoder(nn.Module):
    """Two linear projections of pooled frozen features and CLIP's learnable temperature."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, embed_dim)
        self.text = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scores(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image = nn.functional.normalize(self.image(images), dim=-1)
        return image @ nn.functional.normalize(self.text(texts), dim=-1).t()


def _split_metrics(model: SimpleDualEncoder, split, states: SplitStates) -> dict:
    images, texts = _pooled(states)
    captions, text_to_image = caption_index(split)
    with torch.no_grad():
        scores = model.scores(images, texts)
    metrics = retrieval_metrics(scores, text_to_image)
    metrics["identical_rsum"] = retrieval_metrics_identical_captions(scores, text_to_image, captions)["rsum"]
    return metrics


def run_simple_baseline(recipe_path: str, seed: int, overrides: list[str], patience: int = 10) -> dict:
    """Train the simple baseline on the recipe's cached tower outputs; return its test metrics.

    `overrides` (recipe `--set` strings) may choose the split (`data.args.split_seed=K`)."""
    recipe = load_recipe(recipe_path, [*overrides, f"seed={seed}"])
    train_split, dev_split, test_split, _ = load_recipe_splits(recipe.data)
    processor = build_processor(recipe.model, train_split)
    towers = build_model(recipe.model, processor.tokenizer)
    towers.config.vision_tuned_blocks = 0  # it pools the whole frozen tower's output, whatever GRM tunes
    m = recipe.model
    states = [
        build_split_states(towers, processor, split, True, True, m.tower_cache_dir, m.tower_cache_dtype)
        for split in (train_split, dev_split, test_split)
    ]
    start = time.perf_counter()
    torch.manual_seed(seed)
    images, texts = _pooled(states[0])
    _, rows = caption_index(train_split)
    rows = torch.tensor(rows)
    caption_groups = torch.from_numpy(caption_ids([c for r in train_split["captions"] for c in r]))
    model = SimpleDualEncoder(images.shape[1], texts.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    best, best_state, since_best = -1.0, None, 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(200):
        order = torch.randperm(len(rows), generator=generator)
        for batch in order[: len(order) // 128 * 128].view(-1, 128):
            scores = model.scores(images[rows[batch]], texts[batch])
            positives = positive_pair_mask(rows[batch], len(batch), scores.device, caption_groups[batch])
            loss = infonce_loss(scores, positives, model.logit_scale.exp().clamp(max=100))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        dev = _split_metrics(model, dev_split, states[1])["rsum"]
        if dev > best:
            best, best_state, since_best = dev, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    model.load_state_dict(best_state)
    test = _split_metrics(model, test_split, states[2])
    wall = time.perf_counter() - start
    return {"variant": "simple_baseline", "seed": seed, "wall_s": wall, "dev_rsum": best, **test}


# ----------------------------------------------------------------------------------------- the table
def _cell(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if key in row]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _variant_names(rows: list[dict]) -> list[str]:
    """The variants of `rows`: the ablation order, then labelled variants (`--label`) as they come."""
    known = [*ABLATION_VARIANTS, "simple_baseline"]
    return known + list(dict.fromkeys(row["variant"] for row in rows if row["variant"] not in known))


def summarise(rows: list[dict]) -> str:
    """A markdown table: mean ± std over seeds for each variant."""
    names = _variant_names(rows)
    lines = ["| variant | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
    for name in names:
        runs = [row for row in rows if row["variant"] == name]
        if runs:
            lines.append(f"| {name} | " + " | ".join(_cell(runs, key) for key in REPORTED) + " |")
    return "\n".join(lines)


def _split_name(row: dict) -> str:
    """`fold<k>` for a cross-validation fold, else `seed<s>` for the caption -> split hash seed."""
    return f"fold{row['fold']}" if row.get("fold") is not None else f"seed{row.get('split_seed', 0)}"


def _split_means(rows: list[dict], variant: str, key: str = "rsum") -> dict[str, float]:
    """Split name -> the mean of `key` over the variant's training seeds on that split."""
    by_split: dict[str, list[float]] = {}
    for row in rows:
        if row["variant"] == variant:
            by_split.setdefault(_split_name(row), []).append(row[key])
    return {split: statistics.mean(values) for split, values in sorted(by_split.items())}


def _mean(rows: list[dict], variant: str, key: str = "rsum") -> float:
    """Mean over splits of the per-split means (each split weighs the same, whatever its seed count)."""
    means = list(_split_means(rows, variant, key).values())
    return statistics.mean(means) if means else float("nan")


def paired_differences(rows: list[dict], grm: str = "full", key: str = "rsum") -> str:
    """Per variant, `key` minus full GRM's (variant `grm`) on the same split: mean ± std over splits,
    and the splits where full GRM is ahead."""
    full = _split_means(rows, grm, key)
    lines = [
        "| variant | splits | minus full GRM, mean ± std over splits | splits where full GRM is ahead |",
        "|---|---|---|---|",
    ]
    for name in _variant_names(rows):
        other = _split_means(rows, name, key)
        shared = sorted(set(full) & set(other))
        if name == grm or not shared:
            continue
        deltas = [other[split] - full[split] for split in shared]
        spread = f" ± {statistics.stdev(deltas):.1f}" if len(deltas) > 1 else ""
        wins = sum(delta < 0 for delta in deltas)
        lines.append(
            f"| {name} | {shared} | {statistics.mean(deltas):+.1f}{spread} | {wins} of {len(shared)} |"
        )
    return "\n".join(lines)


def seed_means(rows: list[dict], variant: str, key: str = "rsum") -> dict[int, float]:
    """Training seed -> its mean of `key` over the splits (a k-fold estimate with `--folds`), for the
    seeds the variant ran on every one of its splits (repeated runs of a seed on a split are averaged)."""
    runs = [row for row in rows if row["variant"] == variant]
    splits = {_split_name(row) for row in runs}
    by_seed = {
        seed: _split_means([row for row in runs if row["seed"] == seed], variant, key)
        for seed in sorted({row["seed"] for row in runs})
    }
    return {seed: statistics.mean(means.values()) for seed, means in by_seed.items() if set(means) == splits}


def seeds_over_splits(rows: list[dict], grm: str = "full", key: str = "rsum") -> str:
    """Per variant, each training seed's mean over all splits, then mean ± std over those seeds, and
    whether the mean ± std interval is apart from full GRM's (variant `grm`): with every fold of
    `--folds`, each training seed's cross-validated score, every caption tested once."""
    full = list(seed_means(rows, grm, key).values())
    full_mean, full_std = (statistics.mean(full), statistics.stdev(full)) if len(full) > 1 else (None, None)
    lines = [
        "| variant | splits | per seed (mean over splits) | mean ± std over seeds | apart from full GRM |",
        "|---|---|---|---|---|",
    ]
    for name in _variant_names(rows):
        means = seed_means(rows, name, key)
        if len(means) < 2:
            continue
        mean, std = statistics.mean(means.values()), statistics.stdev(means.values())
        apart = "-"
        if name != grm and full_mean is not None:
            apart = "yes" if abs(full_mean - mean) > full_std + std else "no"
        per_seed = " / ".join(f"{seed}: {value:.1f}" for seed, value in means.items())
        splits = len({_split_name(row) for row in rows if row["variant"] == name})
        lines.append(f"| {name} | {splits} | {per_seed} | {mean:.1f} ± {std:.1f} | {apart} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/openclipart-minilm.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--split-seeds", type=int, nargs="+", default=[0], help="caption -> split hashes to repeat on"
    )
    parser.add_argument("--folds", type=int, nargs="+", help="cross-validation folds to run (of --num-folds)")
    parser.add_argument("--num-folds", type=int, default=10)
    parser.add_argument(
        "--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS)
    )
    parser.add_argument("--no-simple", action="store_true", help="skip the simple frozen-feature baseline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument(
        "--label",
        help="name the trainer variants `<variant>[<label>]` in the rows (e.g. a run with --set changes), "
        "so one table compares them with the unlabelled runs; the REAL_DATA line then reads the labelled runs",
    )
    parser.add_argument(
        "--global-label",
        help="the label of the global dual encoder's rows in the comparison, if not --label's "
        "(e.g. summarising GRM runs labelled L1 with global runs labelled L2 at another schedule)",
    )
    parser.add_argument("--output-dir", default="runs/real_data")
    parser.add_argument(
        "--summarise", nargs="+", metavar="JSON", help="only print the table of saved real_data.json files"
    )
    args = parser.parse_args()
    root = Path(args.output_dir)
    overrides = [*args.set, "train.save_checkpoints=false", "train.log_with=none"]
    rows = []
    if args.summarise:
        rows = [row for path in args.summarise for row in json.loads(Path(path).read_text())]
    splits = [(seed, fold) for seed in args.split_seeds for fold in args.folds or [None]]
    recipe_name = load_recipe(args.recipe).name
    for split_seed, fold in [] if args.summarise else splits:
        split_overrides = [*overrides, f"data.args.split_seed={split_seed}"]
        split_root = root if split_seed == 0 else root / f"split{split_seed}"
        if fold is not None:
            split_overrides += [f"data.args.fold={fold}", f"data.args.num_folds={args.num_folds}"]
            split_root = split_root / f"fold{fold}"
        for seed in args.seeds:
            for name in ([] if args.no_simple else ["simple_baseline"]) + args.variants:
                if name == "simple_baseline":
                    row = run_simple_baseline(args.recipe, seed, split_overrides)
                else:
                    row = run_variant(args.recipe, name, seed, split_overrides, split_root)
                    if args.label:
                        row["variant"] = f"{name}[{args.label}]"
                rows.append({**row, "recipe": recipe_name, "split_seed": split_seed, "fold": fold})
                print(json.dumps(rows[-1]), flush=True)
                root.mkdir(parents=True, exist_ok=True)
                (root / "real_data.json").write_text(json.dumps(rows, indent=2))  # kept if a later run fails
    names = sorted({_split_name(row) for row in rows})
    recipes = sorted({row.get("recipe", "openclipart-minilm") for row in rows})
    print(
        f"\n{' + '.join(recipes)}: test split (captions unseen in training), splits {names}, "
        f"seeds {sorted({row['seed'] for row in rows})}, mean ± std over all runs:"
    )
    print(summarise(rows))
    # with --label L (running or summarising), the comparisons and the REAL_DATA line read the labelled
    # runs: full[L], global_baseline[L] (or global_baseline[G] with --global-label G)
    global_label = args.global_label or args.label
    grm = f"full[{args.label}]" if args.label else "full"
    baseline = f"global_baseline[{global_label}]" if global_label else "global_baseline"
    if len(names) > 1:
        print("\nPaired by split (test rSum):")
        print(paired_differences(rows, grm))
        print("\nEach training seed over all the splits (test rSum), mean ± std over seeds:")
        print(seeds_over_splits(rows, grm))
    grm_minutes = [row["wall_s"] / 60 for row in rows if row["variant"] == grm and "wall_s" in row]
    print(
        f"REAL_DATA grm_rsum={_mean(rows, grm):.1f} global_rsum={_mean(rows, baseline):.1f} "
        f"simple_rsum={_mean(rows, 'simple_baseline'):.1f} "
        f"minutes_per_run={statistics.mean(grm_minutes) if grm_minutes else float('nan'):.2f}"
    )


if __name__ == "__main__":
    main()
