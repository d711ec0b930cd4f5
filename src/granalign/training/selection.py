"""Model selection: dev evaluation after epochs, the best checkpoint, and the final test + export.

The dev split alone decides which weights are kept (`output_dir/best`); the test split is evaluated
once, at the end, on those weights, which are then exported to `output_dir/final`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from granalign.evaluation.protocols import PROTOCOLS, format_metrics_table, save_metrics_json
from granalign.evaluation.runner import evaluate_split
from granalign.modeling_granalign import GranAlignModel
from granalign.training.checkpoint import TrainerState, save_model_dir
from granalign.training.recipe import Recipe

__all__ = ["TrainResult", "evaluate_dev", "finish_run"]


@dataclass
class TrainResult:
    """What a run produced. `interrupted` is True when `train.max_steps` stopped it early."""

    output_dir: Path
    final_dir: Path | None
    best_metric: float | None
    test_metrics: dict[str, Any] | None
    global_step: int
    interrupted: bool
    num_bad_rows: int


def evaluate_dev(
    recipe: Recipe,
    accelerator: Accelerator,
    model: GranAlignModel,
    processor: Any,
    split: Any,
    state: TrainerState,
    output_dir: Path,
    hub_callback: Any = None,
    states: Any = None,
) -> None:
    """Score the dev split; record it in `state`; save `output_dir/best` when dev rSum improves.

    `states` holds the dev split's frozen-tower caches (`SplitStates`), if any."""
    e = recipe.eval
    result = evaluate_split(
        model,
        processor,
        split,
        "all",
        e.batch_size,
        e.image_chunk_size,
        e.text_chunk_size,
        accelerator=accelerator,
        progress=recipe.train.progress_bar,
        states=states,
    )
    metrics = result["metrics"]
    state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
    if recipe.train.log_with != "none":
        accelerator.log({f"dev/{k}": v for k, v in metrics.items()}, step=state.global_step)
    improved = state.best_metric is None or metrics["rsum"] > state.best_metric
    accelerator.print(
        f"epoch {state.epoch}: dev rSum {metrics['rsum']:.2f} (i2t R@1 {metrics['i2t_r1']:.1f}, "
        f"t2i R@1 {metrics['t2i_r1']:.1f}){'  * best' if improved else ''}"
    )
    if improved:
        state.best_metric, state.best_epoch = float(metrics["rsum"]), state.epoch
        if accelerator.is_main_process:
            info = {
                "epoch": state.epoch,
                "step": state.global_step,
                "split": recipe.data.eval_split,
                **metrics,
            }
            save_model_dir(model, processor, recipe, output_dir / "best", {"dev_metrics.json": info})
            if hub_callback is not None:
                hub_callback.on_save(output_dir / "best", step=state.global_step, epoch=state.epoch)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _plot_curves(state, output_dir)


def finish_run(
    recipe: Recipe,
    accelerator: Accelerator,
    model: GranAlignModel,
    processor: Any,
    test_split: Any,
    state: TrainerState,
    output_dir: Path,
    states: Any = None,
) -> TrainResult:
    """Load the dev-selected model, evaluate it on the test split once, export it to `final/`.

    `states` holds the test split's frozen-tower caches (`SplitStates`), if any."""
    best_dir = output_dir / "best"
    if state.best_metric is not None and best_dir.is_dir():
        model = GranAlignModel.from_pretrained(best_dir).to(accelerator.device)
    test = None
    if test_split is not None:
        e = recipe.eval
        test = evaluate_split(
            model,
            processor,
            test_split,
            e.protocol,
            e.batch_size,
            e.image_chunk_size,
            e.text_chunk_size,
            accelerator=accelerator,
            progress=recipe.train.progress_bar,
            states=states,
            identical_captions=e.identical_captions and PROTOCOLS[e.protocol].num_folds == 1,
        )
        accelerator.print(f"test split {recipe.data.test_split!r}, protocol {e.protocol!r}:")
        accelerator.print(format_metrics_table(test))
    final = output_dir / "final"
    if accelerator.is_main_process:
        summary = {
            "best_dev_rsum": state.best_metric,
            "best_epoch": state.best_epoch,
            "global_step": state.global_step,
            "num_bad_rows": state.num_bad_rows,
            "dev_history": state.history,
            "test": test,
        }
        save_model_dir(model, processor, recipe, final, {"metrics.json": summary})
        save_metrics_json(summary, output_dir / "metrics.json")
        _plot_curves(state, output_dir)
        accelerator.print(f"saved the dev-selected model to {final}")
    accelerator.wait_for_everyone()
    return TrainResult(
        output_dir, final, state.best_metric, test, state.global_step, False, state.num_bad_rows
    )


def _plot_curves(state: TrainerState, output_dir: Path) -> None:
    """Write loss, learning-rate and dev-rSum curves to `output_dir/training_curves.png` (needs matplotlib)."""
    try:
        from granalign.viz.curves import plot_training_curves
    except ModuleNotFoundError:  # matplotlib is in the `train` extra; a bare install skips the figure
        return
    rows = state.curves + state.history
    if rows:
        plot_training_curves(rows, output_dir / "training_curves.png")
