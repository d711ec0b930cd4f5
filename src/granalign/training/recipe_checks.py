"""Cross-field validation of a `Recipe`, with errors that name the offending key and value."""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from granalign.training.recipe import Recipe

__all__ = ["validate_recipe"]

# GranAlignConfig arguments that the recipe sets elsewhere (model.vision_config, ...), not in model.grm.
_GRM_RESERVED = {"vision_config", "text_config", "region_feature_dim"}


def _error(message: str) -> Exception:
    from granalign.training.recipe import RecipeError

    return RecipeError(message)


def _at_least(key: str, value: float | None, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise _error(f"{key} must be >= {low}, got {value!r}")


def _unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise _error(f"{key} must be in [0, 1], got {value!r}")


def _grm_arguments() -> set[str] | None:
    try:
        from granalign.configuration_granalign import GranAlignConfig
    except ImportError:  # the model package is optional for parsing recipes
        return None
    params = inspect.signature(GranAlignConfig.__init__).parameters
    return {n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"} - _GRM_RESERVED


def _check_model(recipe: Recipe) -> None:
    m = recipe.model
    image_sources = {
        "model.vision_pretrained": m.vision_pretrained,
        "model.vision_config": m.vision_config,
        "model.region_feature_dim": m.region_feature_dim,
    }
    given = [k for k, v in image_sources.items() if v is not None]
    if len(given) != 1:
        raise _error(f"set exactly one image input of {sorted(image_sources)}, got {given or 'none'}")
    if (m.text_pretrained is None) == (m.text_config is None):
        raise _error(
            "set exactly one of model.text_pretrained (a hub id/path) and model.text_config (a from-scratch "
            f"tower), got text_pretrained={m.text_pretrained!r}, text_config={m.text_config!r}"
        )
    for key, cfg in (("model.vision_config", m.vision_config), ("model.text_config", m.text_config)):
        if cfg is not None and "model_type" not in cfg:
            raise _error(f"{key} needs a 'model_type' key (e.g. 'vit', 'bert'), got keys {sorted(cfg)}")
    if m.text_config is not None and m.tokenizer is None:
        raise _error(
            "model.tokenizer is required with a from-scratch text tower: 'captions' (a word vocabulary built "
            "from the training captions) or a tokenizer id/path"
        )
    if m.region_feature_dim is not None:
        _at_least("model.region_feature_dim", m.region_feature_dim, 1)
        if m.freeze_vision_tower or m.vision_lora is not None:
            raise _error(
                "model.freeze_vision_tower / model.vision_lora need a vision tower; with "
                "model.region_feature_dim the region features are already fixed inputs"
            )
    for key, frozen, lora in (
        ("vision", m.freeze_vision_tower, m.vision_lora),
        ("text", m.freeze_text_tower, m.text_lora),
    ):
        if frozen and lora is not None:
            raise _error(f"model.freeze_{key}_tower and model.{key}_lora exclude each other: pick one")
    _at_least("model.max_length", m.max_length, 2)
    _at_least("model.tokenizer_min_count", m.tokenizer_min_count, 1)
    known = _grm_arguments()
    if known is not None:
        for key in m.grm:
            if key in _GRM_RESERVED:
                raise _error(f"model.grm.{key}: set it as model.{key} instead")
            if key not in known:
                raise _error(f"unknown GRM setting model.grm.{key}; GranAlignConfig accepts {sorted(known)}")


def _check_augment(recipe: Recipe) -> None:
    a = recipe.augment
    _unit("augment.caption_word_prob", a.caption_word_prob)
    fracs = (a.caption_mask_frac, a.caption_replace_frac, a.caption_delete_frac)
    for name, value in zip(("mask", "replace", "delete"), fracs, strict=True):
        _unit(f"augment.caption_{name}_frac", value)
    if not math.isclose(sum(fracs), 1.0, abs_tol=1e-6):
        raise _error(
            "augment.caption_mask_frac + caption_replace_frac + caption_delete_frac must sum to 1, got "
            f"{fracs[0]} + {fracs[1]} + {fracs[2]} = {sum(fracs)}"
        )
    low, high = a.image_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise _error(
            f"augment.image_crop_scale must satisfy 0 < low <= high <= 1, got {list(a.image_crop_scale)}"
        )
    low, high = a.image_crop_ratio
    if not 0.0 < low <= high:
        raise _error(f"augment.image_crop_ratio must satisfy 0 < low <= high, got {list(a.image_crop_ratio)}")
    _unit("augment.horizontal_flip_prob", a.horizontal_flip_prob)
    if a.cache_flipped_images and not recipe.model.freeze_vision_tower:
        raise _error(
            "augment.cache_flipped_images caches views of a frozen vision tower; set "
            "model.freeze_vision_tower: true, or leave it false (a trained tower flips the pixels itself)"
        )


def _check_optim(recipe: Recipe) -> None:
    o = recipe.optim
    if not o.lr > 0:
        raise _error(f"optim.lr must be > 0, got {o.lr!r}")
    _at_least("optim.backbone_lr_multiplier", o.backbone_lr_multiplier, 0.0)
    tuned = recipe.model.grm.get("vision_tuned_blocks", 0)
    if tuned and o.backbone_lr_multiplier == 0:  # the tuned blocks are tower weights: lr * 0 never moves them
        raise _error(
            f"model.grm.vision_tuned_blocks={tuned} trains tower blocks at lr * optim.backbone_lr_multiplier, "
            "which is 0: set the multiplier > 0 (e.g. 0.1)"
        )
    _at_least("optim.weight_decay", o.weight_decay, 0.0)
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise _error(f"optim.betas[{i}] must be in [0, 1), got {beta!r}")
    if not o.eps > 0:
        raise _error(f"optim.eps must be > 0, got {o.eps!r}")
    if any(m < 1 for m in o.milestones) or list(o.milestones) != sorted(set(o.milestones)):
        raise _error(f"optim.milestones must be strictly increasing epochs >= 1, got {o.milestones!r}")
    if not 0.0 < o.gamma <= 1.0:
        raise _error(f"optim.gamma must be in (0, 1], got {o.gamma!r}")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _unit("optim.min_lr_ratio", o.min_lr_ratio)


def _check_train(recipe: Recipe) -> None:
    t = recipe.train
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 2)  # contrastive losses need in-batch negatives
    _at_least("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise _error(f"train.grad_clip must be > 0 or null, got {t.grad_clip!r}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise _error(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay!r}")
    _at_least("train.checkpoint_every_steps", t.checkpoint_every_steps, 0)
    _at_least("train.max_steps", t.max_steps, 1, allow_none=True)
    _at_least("train.log_every_steps", t.log_every_steps, 1)
    _at_least("train.early_stopping_patience", t.early_stopping_patience, 1, allow_none=True)
    _at_least("train.save_total_limit", t.save_total_limit, 1)


def _check_eval(recipe: Recipe) -> None:
    e = recipe.eval
    _at_least("eval.every_epochs", e.every_epochs, 1)
    _at_least("eval.batch_size", e.batch_size, 1)
    _at_least("eval.image_chunk_size", e.image_chunk_size, 1)
    _at_least("eval.text_chunk_size", e.text_chunk_size, 1)
    from granalign.evaluation.protocols import PROTOCOLS

    if e.protocol not in PROTOCOLS:
        raise _error(f"eval.protocol: unknown protocol {e.protocol!r}; known: {sorted(PROTOCOLS)}")


def _check_data(recipe: Recipe) -> None:
    d = recipe.data
    if not d.source.strip():
        raise _error("data.source must not be empty (use 'builtin' for the built-in synthetic scenes)")
    if not d.train_split:
        raise _error("data.train_split must not be empty")
    if d.eval_split is not None and d.eval_split == d.test_split:
        raise _error(
            f"data.eval_split and data.test_split are both {d.test_split!r}: checkpoints are selected on the "
            "dev split, never on the test split"
        )
    _at_least("data.num_workers", d.num_workers, 0)


def _check_finite(value: Any, key: str) -> None:
    """Refuse NaN or infinity anywhere (NaN passes every range check: `margin: .nan` would train silently)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")


def validate_recipe(recipe: Recipe) -> Any:
    """Raise `RecipeError` for the first invalid setting of `recipe`."""
    _check_finite(recipe.to_dict(), "")
    if not recipe.name.strip():
        raise _error("name must not be empty")
    if not recipe.output_dir.strip():
        raise _error("output_dir must not be empty")
    _check_data(recipe)
    _check_model(recipe)
    _check_augment(recipe)
    _check_optim(recipe)
    _check_train(recipe)
    _check_eval(recipe)
    return recipe
