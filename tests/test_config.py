"""GranAlignConfig: defaults from the method, sub-config resolution, round trips and clear errors."""

from __future__ import annotations

import pytest
from tiny_configs import TEXT_TOWERS, VISION_TOWERS, tiny_config
from transformers import AutoConfig

from granalign import GranAlignConfig


def test_defaults_follow_the_method_doc():
    config = GranAlignConfig(text_config={"model_type": "bert"}, vision_config={"model_type": "vit"})
    assert config.embed_dim == 512 and config.num_regions == 5
    assert config.level_weights == [0.4, 0.4, 0.2]
    assert (config.margin, config.gumbel_temperature) == (0.2, 1.0)
    assert (config.recon_loss_weight, config.kl_loss_weight, config.entropy_loss_weight) == (1.0, 1e-3, 0.1)
    assert (config.logvar_min, config.logvar_max) == (-10.0, 2.0)
    assert config.contrastive_loss == "hinge" and config.hardest_negative
    assert config.keep_ratio_loss_weight == 0.0 and config.keep_ratio_target == 0.5
    assert config.similarity_negative_slope == 0.1


@pytest.mark.parametrize("vision", [*VISION_TOWERS, None])
@pytest.mark.parametrize("text", list(TEXT_TOWERS))
def test_round_trip_through_save_and_auto_config(tmp_path, vision, text):
    config = tiny_config(vision, text, num_regions=7, level_weights=(0.5, 0.3, 0.2))
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GranAlignConfig)
    saved, original = loaded.to_dict(), config.to_dict()
    saved.pop("_name_or_path"), original.pop("_name_or_path")
    assert saved == original
    assert loaded.text_config.model_type == text
    if vision is None:
        assert loaded.vision_config is None and loaded.uses_region_features
    else:
        assert loaded.vision_config.model_type == vision


@pytest.mark.parametrize(
    ("vision", "prefix"), [("vit", 1), ("clip_vision_model", 1), ("dinov2", 1), ("swin", 0), ("convnext", 0)]
)
def test_prefix_tokens_inferred_from_the_tower(vision, prefix):
    assert tiny_config(vision).num_prefix_tokens == prefix
    assert tiny_config(vision, vision_num_prefix_tokens=3).num_prefix_tokens == 3


def test_region_features_have_no_prefix_tokens():
    assert tiny_config(None).num_prefix_tokens == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_regions": 0}, "num_regions must be an integer >= 1, got 0"),
        ({"embed_dim": -4}, "embed_dim must be an integer >= 1, got -4"),
        ({"level_weights": (0.4, -0.1, 0.2)}, "level_weights must be three non-negative"),
        ({"level_weights": (0.0, 0.0, 0.0)}, "level_weights must not sum to 0"),
        ({"level_weights": (0.5, 0.5)}, "level_weights must be three"),
        ({"margin": -0.2}, "margin must be >= 0, got -0.2"),
        ({"kl_loss_weight": -1.0}, "kl_loss_weight must be >= 0"),
        ({"gumbel_temperature": 0.0}, "gumbel_temperature must be > 0, got 0.0"),
        (
            {"contrastive_loss": "triplet"},
            "contrastive_loss must be one of ('hinge', 'infonce'), got 'triplet'",
        ),
        ({"kl_variant": "mean"}, "kl_variant must be one of"),
        ({"keep_ratio_target": 1.5}, "keep_ratio_target must be in [0, 1], got 1.5"),
        ({"logvar_min": 3.0}, "logvar_min must be < logvar_max"),
        ({"region_feature_dim": 2048}, "give exactly one image input"),
    ],
)
def test_invalid_values_name_the_field_and_value(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config("vit", **overrides)
    assert message in str(error.value)


def test_missing_towers_are_the_defaults_and_two_image_inputs_raise():
    assert GranAlignConfig(text_config={"model_type": "bert"}).vision_config.model_type == "vit"
    assert GranAlignConfig(region_feature_dim=16).text_config.model_type == "bert"
    with pytest.raises(ValueError, match="give exactly one image input"):
        GranAlignConfig(region_feature_dim=16, vision_config={"model_type": "vit"})
    with pytest.raises(ValueError, match="region_feature_dim must be an integer >= 1, got 0"):
        GranAlignConfig(text_config={"model_type": "bert"}, region_feature_dim=0)


def test_unknown_model_types_are_named():
    with pytest.raises(ValueError, match="vision_config: unknown model_type 'not-a-tower'"):
        GranAlignConfig(text_config={"model_type": "bert"}, vision_config={"model_type": "not-a-tower"})
    with pytest.raises(ValueError, match="text_config: unknown model_type 'gpt-9'"):
        GranAlignConfig(text_config={"model_type": "gpt-9"}, region_feature_dim=8)
    with pytest.raises(ValueError, match="needs a 'model_type' key"):
        GranAlignConfig(text_config={"hidden_size": 8}, region_feature_dim=8)
