"""The accelerate training loop: GRM loss on global in-batch negatives, dev selection, exact resume.

One optimizer step = `gradient_accumulation_steps` batches per process. The first
`sum_violation_warmup_epochs` epochs use the sum of hinge violations, later ones the hardest negative.
After every `eval.every_epochs` epochs the dev split is scored; the best dev rSum is saved to
`output_dir/best` (the test split is never looked at during training). At the end the dev-selected model
is evaluated once on the test split and exported with its processor to `output_dir/final`.
With `train.ema_decay` the evaluations, the selection and the saved models use the moving average of the
trainable weights (`granalign.training.ema`).

Resume is exact: the data order is a pure function of (seed, epoch) (`EpochPermutationSampler`),
augmentation of (seed, epoch, item), and checkpoints hold the RNG states, optimizer, scheduler and the
position in the epoch, so a killed-and-resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from granalign.modeling_granalign import GranAlignModel
from granalign.training.builders import build_model, build_processor, build_train_pairs, load_recipe_splits
from granalign.training.checkpoint import (
    TrainerState,
    claim_output_dir,
    load_checkpoint,
    recover_directory,
    resolve_resume,
    save_checkpoint,
    warn_recipe_changes,
)
from granalign.training.collate import AlignmentCollator, EpochPermutationSampler
from granalign.training.ema import WeightEMA, num_updates_until_decay
from granalign.training.optim import LRSchedule, build_optimizer, build_scheduler
from granalign.training.recipe import RECIPE_FILE, Recipe, save_recipe
from granalign.training.selection import TrainResult, evaluate_dev, finish_run
from granalign.training.step import ContrastiveStep
from granalign.training.tower_cache import SplitStates, build_split_states

__all__ = ["TrainResult", "train"]


def _frozen_tower_states(
    recipe: Recipe,
    accelerator: Accelerator,
    model: GranAlignModel,
    processor: Any,
    *splits: Any,
    flips: bool = False,
) -> dict[str, SplitStates]:
    """Cached outputs of the frozen towers for the train, dev and test splits (empty when none is frozen),
    with the training images' mirror images when the training pairs take cached `flips`.

    The main process computes a missing cache first; the others then read it."""
    m = recipe.model
    frozen_vision = m.freeze_vision_tower and model.vision_model is not None
    if frozen_vision or m.freeze_text_tower:
        accelerator.print(
            "caching the outputs of the frozen "
            + " and ".join(n for n, f in (("vision", frozen_vision), ("text", m.freeze_text_tower)) if f)
            + " tower(s); their side trains without augmentation"
            + (" but the training images' cached mirror images" if flips else "")
        )
    out = {}
    with accelerator.main_process_first():
        for name, split in zip(("train", "dev", "test"), splits, strict=True):
            out[name] = build_split_states(
                model,
                processor,
                split,
                frozen_vision,
                m.freeze_text_tower,
                m.tower_cache_dir,
                m.tower_cache_dtype,
                progress=recipe.train.progress_bar and accelerator.is_local_main_process,
                mirrored=flips and name == "train",
            )
    return out


def _averaged(ema: WeightEMA | None, model: GranAlignModel) -> contextlib.AbstractContextManager:
    """The EMA weights in `model` for the block (`train.ema_decay`), or the model as it is."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext()


def _patience_ran_out(state: TrainerState, patience: int | None) -> bool:
    """True when the last `patience` dev evaluations all came after the best one."""
    if patience is None or state.best_epoch is None:
        return False
    return sum(1 for row in state.history if row["epoch"] > state.best_epoch) >= patience


def train(
    recipe: Recipe, resume: bool | str | os.PathLike[str] = False, hub_callback: Any = None
) -> TrainResult:
    """Train (or resume, `resume=True` for the latest checkpoint of `recipe.output_dir`, or a path).

    `hub_callback` (a `granalign.hub.HubPushCallback`) pushes each new best model when given.
    """
    recipe.validate()
    output_dir = Path(recipe.output_dir)
    t = recipe.train
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.log_with == "none" else t.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
    )
    try:
        return _train_with(accelerator, recipe, resume, hub_callback)
    finally:  # also when training raises: trackers flush what they logged, the process group goes
        accelerator.end_training()


def _train_with(
    accelerator: Accelerator, recipe: Recipe, resume: bool | str | os.PathLike[str], hub_callback: Any
) -> TrainResult:
    """`train`'s body, run by the accelerator `train` built and ends."""
    output_dir = Path(recipe.output_dir)
    t = recipe.train
    show = t.progress_bar and accelerator.is_local_main_process
    claim_output_dir(output_dir, bool(resume), t.overwrite_output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(recipe.seed)

    train_split, dev_split, test_split, num_bad = load_recipe_splits(recipe.data)
    if num_bad:
        accelerator.print(f"skipped {num_bad} rows with unreadable images")

    processor = build_processor(recipe.model, train_split)
    model = build_model(recipe.model, processor.tokenizer)
    pairs = build_train_pairs(recipe, train_split, processor)
    states = _frozen_tower_states(
        recipe,
        accelerator,
        model,
        processor,
        train_split,
        dev_split,
        test_split,
        flips=pairs.cached_flip_prob > 0,
    )
    sampler = EpochPermutationSampler(len(pairs), seed=recipe.seed)
    loader = torch.utils.data.DataLoader(
        pairs,
        batch_size=t.batch_size,
        sampler=sampler,
        collate_fn=AlignmentCollator(
            processor,
            recipe.data.padding,
            states["train"].images,
            states["train"].texts,
            states["train"].mirrored_images,
        ),
        num_workers=recipe.data.num_workers,
        drop_last=recipe.data.drop_last,
        generator=torch.Generator().manual_seed(recipe.seed),  # keeps the global RNG untouched
    )
    o = recipe.optim
    optimizer = build_optimizer(model, o.lr, o.backbone_lr_multiplier, o.weight_decay, o.betas, o.eps)
    step_module, optimizer, loader = accelerator.prepare(ContrastiveStep(model), optimizer, loader)
    if len(loader) == 0:
        raise ValueError(
            f"the training split gives no batch of {t.batch_size} pairs per process ({len(pairs)} pairs); "
            "lower train.batch_size or set data.drop_last=false"
        )
    set_seed(recipe.seed, device_specific=True)  # per-process noise; the model is already identical
    steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
    schedule = LRSchedule.from_recipe(o, t, steps_per_epoch)
    scheduler = build_scheduler(optimizer, schedule)
    accelerator.print(
        f"training {recipe.name!r}: {len(pairs)} pairs from {len(train_split)} images, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, global batch "
        f"{t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps}, "
        f"{steps_per_epoch} steps/epoch x {t.epochs} epochs"
    )

    ema = WeightEMA(model, t.ema_decay, t.ema_warmup) if t.ema_decay is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # a resumed run continues the same average
        total = min(steps_per_epoch * t.epochs, t.max_steps or math.inf)
        holds = num_updates_until_decay(ema.decay, ema.warmup)
        never = "; it never holds in this run (ema_warmup=bias_correction holds it from the start)"
        accelerator.print(
            f"moving average of the weights: decay {ema.decay} from update {holds} of {total} "
            f"(train.ema_warmup={ema.warmup}){never if holds >= total else ''}"
        )
    state = TrainerState(num_bad_rows=num_bad)
    recover_directory(output_dir / "best")
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, scheduler)
        accelerator.print(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step})")
        warn_recipe_changes(accelerator, recipe, output_dir / RECIPE_FILE)
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir / RECIPE_FILE)
    if t.log_with != "none":
        accelerator.init_trackers(recipe.name, config=recipe.flat_dict())

    unwrapped: GranAlignModel = accelerator.unwrap_model(step_module).model
    warmup_epochs = unwrapped.config.sum_violation_warmup_epochs
    world = accelerator.num_processes
    interrupted = False
    while state.epoch < t.epochs and not interrupted:
        epoch = state.epoch
        sampler.set_epoch(epoch)
        pairs.set_epoch(epoch)
        loader.set_epoch(epoch)
        skip = state.step_in_epoch * t.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        if skip:
            epoch_loader.set_epoch(epoch)
        hardest = epoch >= warmup_epochs
        step_module.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=state.step_in_epoch,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not show,
            dynamic_ncols=True,
        )
        for batch in epoch_loader:
            with accelerator.accumulate(step_module):
                objective = step_module(batch, hardest_negative=hardest)
                accelerator.backward(objective.loss * world)
                if accelerator.sync_gradients and t.grad_clip is not None:
                    accelerator.clip_grad_norm_(step_module.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[-1]
            scheduler.step()
            if ema is not None:
                ema.update(unwrapped)
            state.global_step += 1
            state.step_in_epoch += 1
            loss = objective.loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if state.global_step % t.log_every_steps == 0:
                state.curves.append({"step": state.global_step, "epoch": epoch, "loss": loss, "lr": lr})
            if t.log_with != "none" and state.global_step % t.log_every_steps == 0:
                logs = {"train/loss": loss, "train/lr": lr, "train/epoch": epoch}
                logs.update({f"train/{k}": v.item() for k, v in objective.terms.items()})
                accelerator.log(logs, step=state.global_step)
            if t.max_steps is not None and state.global_step >= t.max_steps:
                interrupted = True
                break
            if (
                t.save_checkpoints
                and t.checkpoint_every_steps
                and state.global_step % t.checkpoint_every_steps == 0
            ):
                save_checkpoint(accelerator, output_dir, state, scheduler, t.save_total_limit)
        bar.close()
        if interrupted:
            save_checkpoint(accelerator, output_dir, state, scheduler, t.save_total_limit)
            accelerator.print(f"stopped at train.max_steps={t.max_steps}; resume with --resume")
            break
        state.epoch += 1
        state.step_in_epoch = 0
        if dev_split is not None and (state.epoch % recipe.eval.every_epochs == 0 or state.epoch == t.epochs):
            with _averaged(ema, unwrapped):
                evaluate_dev(
                    recipe, accelerator, unwrapped, processor, dev_split, state, output_dir, hub_callback,
                    states["dev"],
                )  # fmt: skip
        if t.save_checkpoints:
            save_checkpoint(accelerator, output_dir, state, scheduler, t.save_total_limit)
        if _patience_ran_out(state, t.early_stopping_patience):
            accelerator.print(
                f"early stopping: no better dev rSum for {t.early_stopping_patience} evaluation(s) since "
                f"epoch {state.best_epoch}"
            )
            break

    result = TrainResult(output_dir, None, state.best_metric, None, state.global_step, interrupted, num_bad)
    if not interrupted:
        with _averaged(ema, unwrapped):  # without a dev split, final/ holds the averaged weights
            result = finish_run(
                recipe, accelerator, unwrapped, processor, test_split, state, output_dir, states["test"]
            )
    return result
