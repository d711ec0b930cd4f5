"""Training recipes: typed dataclasses loaded from YAML/JSON, with dotted `--set key=value` overrides.

A recipe is the whole description of a run (data, model, augmentation, optimiser, loop); the model's own
hyper-parameters live in `model.grm` and end up in `GranAlignConfig`, never in a pickled namespace.

Example:
```python
>>> recipe = load_recipe("configs/tiny.yaml", overrides=["train.epochs=2", "optim.lr=1e-3"])
>>> recipe.train.epochs
2
```
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from granalign.training.recipe_parsing import RecipeError, apply_dotted_overrides, build_dataclass

__all__ = [
    "RECIPE_FILE",
    "AugmentRecipe",
    "DataRecipe",
    "EmaWarmup",
    "EvalRecipe",
    "ModelRecipe",
    "OptimRecipe",
    "Recipe",
    "RecipeError",
    "TrainRecipe",
    "apply_overrides",
    "load_recipe",
    "read_recipe_file",
    "recipe_from_dict",
    "save_recipe",
]

EmaWarmup = Literal["num_updates", "bias_correction"]  # train.ema_warmup (training/ema.py)

# The recipe saved beside a trained model (and its checkpoints), read back by `evaluate` and `push`.
RECIPE_FILE = "granalign_recipe.yaml"


@dataclass
class DataRecipe:
    """Where the data comes from and how pairs are batched."""

    source: str = "builtin"  # "builtin" (synthetic scenes) or a source for `load_alignment_dataset`
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the dataset builder/loader
    train_split: str = "train"
    eval_split: str | None = "validation"  # dev split: checkpoint selection (never the test split)
    test_split: str | None = "test"  # evaluated once, after training, on the dev-selected model
    skip_bad_rows: bool = False  # drop (and count) unreadable images instead of failing
    padding: Literal["longest", "max_length"] = "longest"
    num_workers: int = 0
    drop_last: bool = True


@dataclass
class ModelRecipe:
    """The towers (pretrained ids or from-scratch configs), the tokenizer and the GRM hyper-parameters."""

    vision_pretrained: str | None = None  # hub id / path of a vision tower
    text_pretrained: str | None = None  # hub id / path of a text tower
    vision_config: dict[str, Any] | None = None  # from-scratch vision tower, {"model_type": "vit", ...}
    text_config: dict[str, Any] | None = None  # from-scratch text tower, {"model_type": "bert", ...}
    region_feature_dim: int | None = None  # precomputed region features instead of a vision tower
    tokenizer: str | None = None  # id/path, or "captions" (word vocabulary of the training captions)
    tokenizer_min_count: int = 1  # "captions": keep words seen at least this often
    image_processor: dict[str, Any] | None = None  # from-scratch vision: kwargs of the image processor
    max_length: int = 32
    grm: dict[str, Any] = field(default_factory=dict)  # GranAlignConfig keyword arguments
    # Frozen towers (run_clip's --freeze_vision_model / --freeze_text_model): their token outputs are
    # computed once per item (augmentation-free) and cached on disk, and training runs only the GRM parts.
    freeze_vision_tower: bool = False
    freeze_text_tower: bool = False
    tower_cache_dir: str | None = None  # default: $GRANALIGN_CACHE/tower_states or ~/.cache/granalign/...
    tower_cache_dtype: Literal["float16", "float32"] = "float16"
    # LoRA adapters on a tower through peft, e.g. {"r": 8, "lora_alpha": 16, "target_modules": [...]};
    # merged into the tower's weights on save, so saved models load with plain `from_pretrained`.
    vision_lora: dict[str, Any] | None = None
    text_lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False  # recompute tower activations in the backward pass


@dataclass
class AugmentRecipe:
    """Training-time augmentation (evaluation only resizes, in the processor)."""

    caption_word_prob: float = 0.2  # probability that a word is corrupted
    caption_mask_frac: float = 0.5  # ... by the mask token
    caption_replace_frac: float = 0.1  # ... by a random vocabulary word
    caption_delete_frac: float = 0.4  # ... by deleting it
    image_crop_scale: tuple[float, float] = (0.6, 1.0)  # RandomResizedCrop area range
    image_crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # RandomResizedCrop aspect range
    horizontal_flip_prob: float = 0.5
    flip_swaps_left_right: bool = False  # swap the words "left"/"right" in the caption of a flipped image
    # with a frozen vision tower, also cache each training image's mirror image: an item takes that view
    # with horizontal_flip_prob (the frozen side's only augmentation; its cache then holds two views)
    cache_flipped_images: bool = False


@dataclass
class OptimRecipe:
    """AdamW with a backbone learning-rate multiplier and a step or warmup+cosine schedule."""

    lr: float = 2e-4  # new modules (projections, adapters, prompts)
    backbone_lr_multiplier: float = 0.1  # towers get lr * this
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = field(default_factory=lambda: [9, 15, 20, 25])  # epochs where lr *= gamma
    gamma: float = 0.3
    warmup_steps: int = 0  # linear warmup (optimizer steps), any schedule
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak lr


@dataclass
class TrainRecipe:
    """The loop: epochs, batch, precision, clipping, checkpoints, logging."""

    epochs: int = 30
    batch_size: int = 128  # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_clip: float | None = 2.0
    checkpoint_every_steps: int = 0  # 0 = checkpoint at epoch ends only
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    log_every_steps: int = 10
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    progress_bar: bool = True
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient
    early_stopping_patience: int | None = None  # stop after this many dev evaluations without a new best
    # evaluate, select and save an exponential moving average of the trainable weights (e.g. 0.99)
    ema_decay: float | None = None
    # when ema_decay starts to hold (granalign.training.ema): "num_updates" = min(d, (1+t)/(10+t)), which
    # reaches 0.98 only after 440 steps; "bias_correction" = d from the first step, Adam-style normalised
    ema_warmup: EmaWarmup = "num_updates"
    save_total_limit: int = 1  # keep the newest N epoch/step checkpoints (resume needs 1)
    save_checkpoints: bool = True  # false: write only best/ and final/ (no resume)
    # replace another run found in output_dir (its checkpoints, best/, final/, metrics); without it, or
    # --resume, such a directory is refused so that two runs are never mixed (transformers' name)
    overwrite_output_dir: bool = False


@dataclass
class EvalRecipe:
    """Dev evaluation during training and the final test evaluation."""

    every_epochs: int = 1
    batch_size: int = 64
    protocol: str = "all"  # test protocol: all | flickr30k-1k | coco-1k | coco-5k
    image_chunk_size: int = 64
    text_chunk_size: int = 256
    # also report metrics where a caption counts as correct for every image with an identical caption
    identical_captions: bool = False


@dataclass
class Recipe:
    """A full training run."""

    name: str = "granalign"
    seed: int = 0
    output_dir: str = "runs/granalign"
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), suitable for YAML/JSON."""
        return _plain(dataclasses.asdict(self))

    def flat_dict(self) -> dict[str, bool | int | float | str]:
        """`{"train.epochs": 30, ...}` with scalars kept and other values as strings (for trackers)."""
        flat: dict[str, bool | int | float | str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, sub in value.items():
                    walk(f"{prefix}{key}.", sub)
            else:
                flat[prefix[:-1]] = value if isinstance(value, (bool, int, float, str)) else str(value)

        walk("", self.to_dict())
        return flat

    def validate(self) -> Recipe:
        """Check cross-field constraints; raise `RecipeError` naming the key. Returns `self`."""
        from granalign.training.recipe_checks import validate_recipe

        validate_recipe(self)
        return self


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------- dict, overrides
def recipe_from_dict(data: dict[str, Any], validate: bool = True) -> Recipe:
    """Build a `Recipe` from a nested dict, checking every key and value type."""
    recipe = build_dataclass(Recipe, data)
    return recipe.validate() if validate else recipe


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides (values parsed as YAML) to a recipe dict, returning a copy.

    Keys are checked against the recipe schema (dict-typed fields such as `model.grm` accept new keys),
    so a typo fails with the closest known key.
    """
    return apply_dotted_overrides(Recipe, data, overrides)


# ------------------------------------------------------------------------------------------- file I/O
def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON recipe file into a dict (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise RecipeError(f"cannot parse recipe {str(path)!r}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"recipe {str(path)!r} must be a mapping at the top level, got {type(data).__name__}"
        )
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML/JSON recipe, apply dotted `key=value` overrides, check types and constraints."""
    data = apply_overrides(read_recipe_file(path), list(overrides or []))
    try:
        return recipe_from_dict(data)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the recipe as YAML (keys in schema order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    return path
