"""Ablation of GRM on the built-in held-out split: full model, each part off, and a global dual encoder.

Every variant trains with the same recipe, towers and budget (`configs/tiny.yaml` by default) for each
seed, then reports test-split retrieval (mean ± std over seeds) and wall time. The test split holds out
colour-shape combinations never seen in training, so it measures compositional generalisation.

    python benchmarks/ablation.py                              # 6 variants x 3 seeds
    python benchmarks/ablation.py --seeds 0 --variants full global_baseline --set train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from granalign.configuration_granalign import ABLATION_VARIANTS
from granalign.training.loop import train
from granalign.training.recipe import load_recipe

REPORTED = ("rsum", "i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10")


def run_variant(recipe_path: str, variant: str, seed: int, overrides: list[str], root: Path) -> dict:
    """Train one variant with one seed; return its test metrics and wall time."""
    switches = [f"model.grm.{key}={json.dumps(value)}" for key, value in ABLATION_VARIANTS[variant].items()]
    output_dir = root / f"{variant}-seed{seed}"
    recipe = load_recipe(
        recipe_path,
        [
            *overrides,
            *switches,
            f"seed={seed}",
            f"output_dir={output_dir}",
            "train.progress_bar=false",
            "train.overwrite_output_dir=true",
        ],  # a rerun replaces its own earlier run
    )
    start = time.perf_counter()
    result = train(recipe)
    if result.test_metrics is None:
        raise RuntimeError(f"{variant} seed {seed}: the run reported no test metrics")
    metrics = dict(result.test_metrics.get("metrics", result.test_metrics))
    if "identical_captions" in result.test_metrics:
        metrics["identical_rsum"] = result.test_metrics["identical_captions"]["rsum"]
    wall = time.perf_counter() - start
    return {"variant": variant, "seed": seed, "wall_s": wall, "dev_rsum": result.best_metric, **metrics}


def summarise(rows: list[dict]) -> str:
    """A fixed-width table: mean ± std over seeds for each variant."""
    lines = [f"{'variant':26s}" + "".join(f"{key:>16s}" for key in (*REPORTED, "wall_s"))]
    for variant in ABLATION_VARIANTS:
        runs = [row for row in rows if row["variant"] == variant]
        if not runs:
            continue
        cells = []
        for key in (*REPORTED, "wall_s"):
            values = [row[key] for row in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):9.1f} ±{spread:5.1f}")
        lines.append(f"{variant:26s}" + "".join(f"{cell:>16s}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS)
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--output-dir", default="runs/ablation")
    args = parser.parse_args()
    root = Path(args.output_dir)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(run_variant(args.recipe, variant, seed, args.set, root))
            print(json.dumps(rows[-1]), flush=True)
    (root / "ablation.json").write_text(json.dumps(rows, indent=2))
    print(f"\nTest split of the built-in scenes (held-out colour-shape pairs), seeds {args.seeds}:")
    print(summarise(rows))


if __name__ == "__main__":
    main()
