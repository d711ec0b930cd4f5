"""Recipes: every shipped config parses and validates; overrides are typed; bad keys fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from granalign.training.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    read_recipe_file,
    recipe_from_dict,
    save_recipe,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = {
    "vit-base-224": ("google/vit-base-patch16-224-in21k", 5),
    "vit-base-384": ("google/vit-base-patch16-384", 5),
    "swin-base-224": ("microsoft/swin-base-patch4-window7-224", 50),
    "swin-base-384": ("microsoft/swin-base-patch4-window12-384", 50),
}
PROTOCOLS = {"flickr30k": "flickr30k-1k", "coco": "coco-1k"}


def _minimal() -> dict:
    return {
        "model": {
            "vision_config": {"model_type": "vit", "hidden_size": 16},
            "text_config": {"model_type": "bert", "hidden_size": 16},
            "tokenizer": "captions",
        }
    }


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.eval_split != recipe.data.test_split


@pytest.mark.parametrize("backbone", sorted(PAPER))
@pytest.mark.parametrize("dataset", sorted(PROTOCOLS))
def test_paper_recipes_follow_the_training_setup(backbone: str, dataset: str) -> None:
    recipe = load_recipe(CONFIGS / f"{backbone}-{dataset}.yaml")
    vision_id, regions = PAPER[backbone]
    assert recipe.model.vision_pretrained == vision_id
    assert recipe.model.text_pretrained == "bert-base-uncased"
    assert recipe.model.grm["num_regions"] == regions
    assert (recipe.train.batch_size, recipe.train.epochs, recipe.train.grad_clip) == (128, 30, 2.0)
    assert (recipe.optim.lr, recipe.optim.backbone_lr_multiplier, recipe.optim.gamma) == (2e-4, 0.1, 0.3)
    assert recipe.optim.schedule == "step" and recipe.optim.milestones == [9, 15, 20, 25]
    assert recipe.augment.image_crop_scale == (0.6, 1.0) and recipe.augment.caption_word_prob == 0.2
    assert recipe.eval.protocol == PROTOCOLS[dataset]
    assert recipe.data.eval_split == "validation"


def test_tiny_recipe_is_offline_and_records_its_dataset() -> None:
    recipe = load_recipe(CONFIGS / "tiny.yaml")
    assert recipe.data.source == "builtin" and recipe.data.args
    assert recipe.model.vision_pretrained is None and recipe.model.text_pretrained is None
    assert recipe.model.tokenizer == "captions"


def test_overrides_are_parsed_as_yaml_and_type_checked(tmp_path: Path) -> None:
    path = save_recipe(recipe_from_dict(_minimal()), tmp_path / "r.yaml")
    recipe = load_recipe(
        path,
        [
            "train.epochs=3",
            "optim.lr=1",  # an int widens to float
            "optim.eps=2e-8",  # YAML reads this as a string; numeric strings are accepted for floats
            "optim.milestones=[2, 5]",
            "train.max_steps=null",
            "model.grm.num_regions=7",  # dict fields accept new keys
            "data.args.num_train=10",
            "augment.image_crop_scale=[0.5, 0.9]",
        ],
    )
    assert recipe.train.epochs == 3
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.eps == 2e-8
    assert recipe.optim.milestones == [2, 5]
    assert recipe.model.grm == {"num_regions": 7}
    assert recipe.data.args == {"num_train": 10}
    assert recipe.augment.image_crop_scale == (0.5, 0.9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "did you mean 'epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.mixed_precision=fp8", "expected one of ['no', 'bf16', 'fp16']"),
        ("train.progress_bar=1", "expected true/false"),
        ("train=3", "is a section"),
        ("epochs", "must look like key=value"),
        ("augment.caption_mask_frac=0.9", "must sum to 1"),
        ("augment.image_crop_scale=[0.9, 0.5]", "augment.image_crop_scale"),
        ("optim.milestones=[5, 3]", "strictly increasing"),
        ("eval.protocol=coco-2k", "unknown protocol 'coco-2k'"),
        ("model.grm.num_region=3", "unknown GRM setting model.grm.num_region"),
        ("model.grm.text_config={}", "set it as model.text_config"),
        ("data.test_split=validation", "never on the test split"),
        ("model.region_feature_dim=2048", "exactly one image input"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    path = save_recipe(recipe_from_dict(_minimal()), tmp_path / "r.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert message in str(info.value)


def test_unknown_key_in_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  batch: 4\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.batch' \(did you mean 'batch_size'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        read_recipe_file(path)


def test_text_tower_from_scratch_needs_a_tokenizer() -> None:
    data = _minimal()
    del data["model"]["tokenizer"]
    with pytest.raises(RecipeError, match=r"model\.tokenizer is required"):
        recipe_from_dict(data)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    recipe = load_recipe(CONFIGS / "tiny.yaml", ["train.epochs=2"])
    again = load_recipe(save_recipe(recipe, tmp_path / "again.yaml"))
    assert again == recipe
    json_path = tmp_path / "r.json"
    json_path.write_text(__import__("json").dumps(recipe.to_dict()))
    assert load_recipe(json_path) == recipe


def test_apply_overrides_does_not_mutate_its_input() -> None:
    data = _minimal()
    apply_overrides(data, ["train.epochs=5"])
    assert "train" not in data
