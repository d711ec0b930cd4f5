"""The transformers conventions users bring from CLIP/SigLIP (beyond the common suites): sub-configs, the
default config, `get_*_features` outputs, hidden states from `forward`, device-map and attention-backend
declarations, and `torch.compile` without graph breaks."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import image_inputs, text_inputs, tiny_model
from transformers import AutoConfig, AutoModel

from granalign import GranAlignConfig, GranAlignModel


def test_default_config_is_valid_and_invalid_values_still_raise():
    config = AutoConfig.for_model("granalign")
    assert isinstance(config, GranAlignConfig)
    assert (config.vision_config.model_type, config.text_config.model_type) == ("vit", "bert")
    assert GranAlignConfig(region_feature_dim=8).vision_config is None  # regions need no default tower
    assert set(GranAlignConfig.sub_configs) == {"vision_config", "text_config"}
    with pytest.raises(ValueError, match="give exactly one image input"):
        GranAlignConfig(region_feature_dim=8, vision_config={"model_type": "vit"})
    with pytest.raises(ValueError, match="embed_dim must be an integer >= 1, got 0"):
        GranAlignConfig(embed_dim=0)


@pytest.mark.parametrize("vision", ["vit", None])
def test_from_pretrained_reaches_both_towers(tmp_path, vision):
    tiny_model(vision).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.bfloat16)
    towers = [model.text_model] + ([model.vision_model] if vision else [])
    for tower in towers:
        assert tower.config._attn_implementation == "eager"
        assert next(tower.parameters()).dtype == torch.bfloat16
    sdpa = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert all(
        tower.config._attn_implementation == "sdpa"
        for tower in [sdpa.text_model, sdpa.vision_model][: len(towers)]
    )


def test_attention_backends_and_no_split_modules_are_declared():
    model = tiny_model("vit")
    # post_init gathers the towers' own no-split modules into the model's (what device_map="auto" reads)
    assert {"TokenAdapter", "RegionPrompting", "ViTLayer", "BertLayer"} <= set(model._no_split_modules)
    for flag in (
        "_supports_sdpa",
        "_supports_flash_attn",
        "_supports_flex_attn",
        "_supports_attention_backend",
    ):
        assert getattr(GranAlignModel, flag) is True, flag


@pytest.mark.parametrize("vision", ["vit", None])
def test_get_features_return_clip_style_outputs(vision):
    model = tiny_model(vision).eval()
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    images, captions = image_inputs(vision, batch=2), text_inputs(batch=3)
    with torch.no_grad():
        image = model.get_image_features(**images, output_hidden_states=True, output_attentions=True)
        text = model.get_text_features(**captions, output_hidden_states=True)
        torch.testing.assert_close(image.pooler_output, model.encode_image(**images).image_embeds)
        torch.testing.assert_close(text.pooler_output, model.encode_text(**captions).text_embeds)
        as_tuple = model.get_text_features(**captions, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], text.pooler_output)
    assert text.last_hidden_state.shape == (3, 9, 32)
    assert len(text.hidden_states) == 3  # the embeddings and 2 layers
    if vision is None:  # regions: the features themselves, no tower states
        torch.testing.assert_close(image.last_hidden_state, images["region_features"])
        assert image.hidden_states is None
    else:
        assert image.last_hidden_state.shape == (2, 17, 32)  # [CLS] + 4 x 4 patches
        assert len(image.hidden_states) == 3 and len(image.attentions) == 2


def test_forward_returns_tower_hidden_states_when_asked():
    model = tiny_model("vit").eval()
    inputs = {**image_inputs("vit", batch=2), **text_inputs(batch=2)}
    with torch.no_grad():
        plain = model(**inputs)
        full = model(**inputs, output_hidden_states=True)
    assert plain.text_model_output.hidden_states is None
    assert len(full.text_model_output.hidden_states) == 3
    assert len(full.vision_model_output.hidden_states) == 3
    torch.testing.assert_close(full.logits_per_image, plain.logits_per_image)


@pytest.mark.parametrize("vision", ["vit", None])
def test_torch_compile_has_no_graph_breaks(vision):
    """fullgraph=True fails on any graph break; the eager backend checks tracing without compiling C++."""
    torch._dynamo.reset()
    model = tiny_model(vision).eval()
    images, captions = image_inputs(vision, batch=2), text_inputs(batch=3)
    with torch.no_grad():
        expected = model(**images, **captions).logits_per_image
        logits = torch.compile(model, backend="eager", fullgraph=True)(**images, **captions).logits_per_image
        image = torch.compile(model.encode_image, backend="eager", fullgraph=True)(**images)
        text = torch.compile(model.encode_text, backend="eager", fullgraph=True)(**captions)
        scores = torch.compile(model.score, backend="eager", fullgraph=True)(image, text)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(scores * model.temperature_scale(), expected)
    empty = {**captions, "attention_mask": captions["attention_mask"].clone()}
    empty["attention_mask"][1] = 0
    with pytest.raises(RuntimeError, match="every caption needs at least one token"):
        torch.compile(model.encode_text, backend="eager", fullgraph=True)(**empty)
