"""Frozen towers: cached token outputs equal running the tower, the cache is keyed by what it depends on,
and training on caches leaves the towers untouched. Plus the real-data fixes of the same issue:
identical captions as positives, the identical-captions metric, the learnable logit scale, early
stopping and checkpoint limits."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import MICRO_RECIPE, image_inputs, text_inputs, tiny_model

from granalign.data.captions import caption_ids
from granalign.evaluation.metrics import retrieval_metrics, retrieval_metrics_identical_captions
from granalign.losses_granalign import hinge_triplet_loss, positive_pair_mask
from granalign.training.builders import build_processor, load_recipe_splits
from granalign.training.collate import AlignmentCollator, CaptionPairDataset
from granalign.training.loop import train
from granalign.training.recipe import recipe_from_dict
from granalign.training.tower_cache import cache_image_states, cache_text_states


def _micro(tmp_path: Path, **train_options) -> dict:
    recipe = copy.deepcopy(MICRO_RECIPE)
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["model"].update(
        freeze_vision_tower=True, freeze_text_tower=True, tower_cache_dir=str(tmp_path / "cache")
    )
    recipe["train"].update(train_options)
    return recipe


def test_cached_tower_states_give_the_same_encodings_as_running_the_towers() -> None:
    model = tiny_model("vit").eval()
    pixels, captions = image_inputs("vit", batch=3), text_inputs(batch=4)
    with torch.no_grad():
        direct_image = model.encode_image(**pixels)
        cached_image = model.encode_image(vision_hidden_states=model.vision_tower_states(**pixels))
        direct_text = model.encode_text(**captions)
        states = model.text_tower_states(captions["input_ids"], captions["attention_mask"])
        cached_text = model.encode_text(attention_mask=captions["attention_mask"], text_hidden_states=states)
    for direct, cached in ((direct_image, cached_image), (direct_text, cached_text)):
        for key, value in direct.items():
            torch.testing.assert_close(cached[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="vision_hidden_states must be"):
        model.encode_image(vision_hidden_states=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="text_hidden_states must be"):
        model.encode_text(text_hidden_states=torch.zeros(2, 5))


@pytest.fixture(scope="module")
def micro_splits():
    recipe = recipe_from_dict(copy.deepcopy(MICRO_RECIPE))
    train_split, _, _, _ = load_recipe_splits(recipe.data)
    return recipe, train_split


def test_text_and_image_caches_hold_the_tower_outputs_and_are_keyed_by_weights(tmp_path, micro_splits):
    recipe, split = micro_splits
    processor = build_processor(recipe.model, split)
    model = tiny_model("vit").eval()
    model.vision_model = tiny_model("vit").vision_model  # same architecture as the processor's 32-px input
    model.text_model.resize_token_embeddings(len(processor.tokenizer))
    captions = [c for row in split["captions"] for c in row][:10]
    cache = cache_text_states(model, processor, captions, tmp_path, dtype="float32", progress=False)
    inputs = processor(text=captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model.text_tower_states(inputs["input_ids"], inputs["attention_mask"])
    states, mask = cache.batch(range(10))
    torch.testing.assert_close(mask, inputs["attention_mask"][:, : mask.shape[1]])
    torch.testing.assert_close(states * mask[..., None], expected[:, : mask.shape[1]] * mask[..., None])
    assert cache.encoded == 10
    # the same items read the store (any subset, any order); a changed tower gets its own store
    again = cache_text_states(model, processor, captions[::-1], tmp_path, "float32", progress=False)
    assert again.path == cache.path and again.encoded == 0
    torch.testing.assert_close(again.batch(range(10))[0][:, : states.shape[1]], states.flip(0))
    assert cache_text_states(model, processor, captions[:9], tmp_path, "float32", progress=False).encoded == 0
    with torch.no_grad():
        model.text_model.embeddings.word_embeddings.weight[5] += 1
    changed = cache_text_states(model, processor, captions, tmp_path, "float32", progress=False)
    assert changed.path != cache.path and changed.encoded == 10

    images = cache_image_states(model, processor, split, tmp_path, dtype="float16", progress=False)
    pixels = processor(images=split[:4]["image"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.vision_tower_states(pixels)
    got, mask = images.batch([0, 1, 2, 3])
    assert bool(mask.all()) and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)  # float16 storage
    assert not list(Path(tmp_path).glob(".tmp-*"))  # written atomically, no leftovers


def test_splits_sharing_items_encode_only_new_ones_and_read_across_shards(tmp_path, micro_splits) -> None:
    recipe, split = micro_splits
    processor = build_processor(recipe.model, split)
    model = tiny_model("vit").eval()
    model.text_model.resize_token_embeddings(len(processor.tokenizer))
    first = cache_image_states(model, processor, split.select(range(4)), tmp_path, "float32", progress=False)
    both = cache_image_states(
        model, processor, split.select(range(2, 7)), tmp_path, "float32", progress=False
    )
    assert (first.encoded, both.encoded) == (4, 3)  # rows 2 and 3 come from the first shard
    assert len(set(both.shard_of.tolist())) == 2
    pixels = processor(images=split[2:7]["image"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.vision_tower_states(pixels)
    got, mask = both.batch([4, 0, 1, 3])
    torch.testing.assert_close(got, expected[[4, 0, 1, 3]], atol=1e-5, rtol=1e-5)
    assert bool(mask.all())
    captions = ["a red apple", "two dogs on grass", "a red apple"]
    texts = cache_text_states(model, processor, captions, tmp_path, "float32", progress=False)
    assert texts.encoded == 2  # identical captions are one item
    more = cache_text_states(model, processor, ["a cat", *captions], tmp_path, "float32", progress=False)
    assert more.encoded == 1
    states, mask = more.batch([1, 0, 3])  # shards of different widths, padded to the longest item
    alone = processor(text=["a red apple", "a cat"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        direct = model.text_tower_states(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(mask[:2, : alone["attention_mask"].shape[1]], alone["attention_mask"])
    torch.testing.assert_close(states[0, : int(mask[0].sum())], direct[0, : int(mask[0].sum())])
    torch.testing.assert_close(states[1, : int(mask[1].sum())], direct[1, : int(mask[1].sum())])
    assert torch.equal(states[0], states[2]) and not list(Path(tmp_path).rglob(".tmp-*"))


def test_training_on_frozen_towers_leaves_them_unchanged_and_skips_their_augmentation(
    tmp_path, monkeypatch
) -> None:
    recipe = recipe_from_dict(_micro(tmp_path, epochs=1))
    import granalign.training.loop as loop
    from granalign.training.builders import build_model, build_train_pairs

    train_split, _, _, _ = load_recipe_splits(recipe.data)
    processor = build_processor(recipe.model, train_split)
    pairs = build_train_pairs(recipe, train_split, processor)
    assert pairs.image_augmenter is None and pairs.caption_augmenter is None and "image" not in pairs[0]

    built = {}

    def build_and_remember(*args):
        model = built["model"] = build_model(*args)
        built["initial"] = copy.deepcopy(model.state_dict())
        return model

    monkeypatch.setattr(loop, "build_model", build_and_remember)
    result = train(recipe)
    from granalign import GranAlignModel

    model, initial = built["model"], built["initial"]
    assert not any(p.requires_grad for p in model.text_model.parameters())
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    trained = GranAlignModel.from_pretrained(result.final_dir).state_dict()
    towers = [k for k in initial if k.startswith(("vision_model.", "text_model."))]
    assert towers and all(torch.equal(initial[k], trained[k]) for k in towers)
    assert not torch.equal(initial["visual_projection.weight"], trained["visual_projection.weight"])

    # the saved model evaluates with the identical-captions metric beside the strict one
    from granalign.cli import main

    report = tmp_path / "eval.json"
    args = ["evaluate", str(result.final_dir), "--split", "test", "--no-progress", "--identical-captions"]
    assert main([*args, "--output-json", str(report)]) == 0
    saved = __import__("json").loads(report.read_text())
    assert saved["identical_captions"]["rsum"] >= saved["metrics"]["rsum"]
    assert main([*args, "--protocol", "coco-1k"]) == 2  # five folds: refused, naming the protocol


def test_tuned_blocks_of_a_frozen_tower_train_on_its_cache_and_the_rest_stays_fixed(tmp_path) -> None:
    recipe = _micro(tmp_path, epochs=1)
    lite = {"width_coefficient": 0.25, "depth_coefficient": 0.25, "image_size": 32, "hidden_size": 16}
    recipe["model"]["vision_config"] = {"model_type": "efficientnet_lite", **lite}
    recipe["model"]["grm"]["vision_tuned_blocks"] = 1
    with pytest.raises(
        ValueError, match=r"vision_tuned_blocks=1 .* optim.backbone_lr_multiplier, which is 0"
    ):
        recipe_from_dict({**recipe, "optim": {**recipe["optim"], "backbone_lr_multiplier": 0.0}}).validate()
    from granalign import GranAlignModel
    from granalign.training.builders import build_model

    parsed = recipe_from_dict(recipe)
    train_split, _, _, _ = load_recipe_splits(parsed.data)
    torch.manual_seed(parsed.seed)
    initial = build_model(parsed.model, build_processor(parsed.model, train_split).tokenizer).state_dict()
    trained = GranAlignModel.from_pretrained(train(parsed).final_dir).state_dict()
    tower = [
        k for k in initial if k.startswith("vision_model.") and "running" not in k and "batches" not in k
    ]
    tuned = [k for k in tower if k.startswith(("vision_model.blocks.6.", "vision_model.head."))]
    changed = {k for k in tower if not torch.equal(initial[k], trained[k])}
    assert tuned and changed == set(tuned)  # the last block and the head train, the cached part does not


def test_collator_reads_cached_states_by_row_and_caption(tmp_path, micro_splits) -> None:
    recipe, split = micro_splits
    processor = build_processor(recipe.model, split)
    model = tiny_model("vit").eval()
    model.text_model.resize_token_embeddings(len(processor.tokenizer))
    captions = [c for row in split["captions"] for c in row]
    texts = cache_text_states(model, processor, captions, tmp_path, "float32", progress=False)
    images = cache_image_states(model, processor, split, tmp_path, "float32", progress=False)
    pairs = CaptionPairDataset(split, load_images=False)
    batch = AlignmentCollator(processor, image_states=images, text_states=texts)([pairs[7], pairs[0]])
    assert "pixel_values" not in batch and "input_ids" not in batch
    expected_images, _ = images.batch([pairs[7]["image_index"], pairs[0]["image_index"]])
    torch.testing.assert_close(batch["vision_hidden_states"], expected_images)
    expected_text, mask = texts.batch([7, 0])
    torch.testing.assert_close(batch["text_hidden_states"], expected_text)
    torch.testing.assert_close(batch["attention_mask"], mask)


def test_identical_captions_are_positives_in_the_loss() -> None:
    assert caption_ids(["A red  apple", "a red apple", "a pear"]).tolist() == [0, 0, 1]
    positives = positive_pair_mask(torch.tensor([0, 1, 2]), 3, torch.device("cpu"), torch.tensor([5, 5, 6]))
    assert positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # pair 0 and 1 share a caption: scoring image 0 high with caption 1 must not be penalised
    scores = torch.tensor([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 1.0]])
    strict = hinge_triplet_loss(scores, positive_pair_mask(None, 3, scores.device), 0.2, False)
    grouped = hinge_triplet_loss(scores, positives, 0.2, False)
    assert strict > 0 and grouped == 0
    model = tiny_model("vit")
    images, texts = image_inputs("vit", batch=4), text_inputs(batch=4)
    with torch.no_grad():
        output = model(**images, **texts)
        ids = torch.arange(4)
        plain = model.compute_loss(output.image_outputs, output.text_outputs, ids, False, output.level_scores)
        same = model.compute_loss(
            output.image_outputs,
            output.text_outputs,
            ids,
            False,
            output.level_scores,
            torch.tensor([0, 0, 1, 2]),
        )
    assert same.terms["contrastive_original"] < plain.terms["contrastive_original"]


def _reference_identical_caption_ranks(scores: np.ndarray, text_to_image: list[int], captions: list[str]):
    groups = caption_ids(captions).tolist()
    image_groups = [
        {groups[j] for j, i in enumerate(text_to_image) if i == row} for row in range(len(scores))
    ]
    positive = np.array(
        [[groups[j] in image_groups[i] for j in range(len(captions))] for i in range(len(scores))]
    )
    i2t = [1 + sum(scores[i, j] >= scores[i][positive[i]].max() and not positive[i, j] for j in range(len(captions)))
           for i in range(len(scores))]  # fmt: skip
    t2i = [1 + sum(scores[i, j] >= scores[:, j][positive[:, j]].max() and not positive[i, j] for i in range(len(scores)))
           for j in range(len(captions))]  # fmt: skip
    return np.array(i2t), np.array(t2i)


def test_identical_caption_metric_matches_a_brute_force_reference_and_the_strict_one_without_repeats() -> (
    None
):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 12)).astype(np.float32)  # many ties
    text_to_image = [j // 2 for j in range(12)]
    captions = [f"caption {j}" for j in range(12)]
    assert retrieval_metrics_identical_captions(scores, text_to_image, captions) == retrieval_metrics(
        scores, text_to_image
    )
    captions[0] = captions[5] = "Gramastar"
    captions[7] = "gramastar "
    i2t, t2i = _reference_identical_caption_ranks(scores, text_to_image, captions)
    got = retrieval_metrics_identical_captions(scores, text_to_image, captions)
    assert got["i2t_r1"] == pytest.approx(100 * np.mean(i2t <= 1))
    assert got["t2i_r5"] == pytest.approx(100 * np.mean(t2i <= 5))
    assert got["t2i_meanr"] == pytest.approx(t2i.mean()) and got["i2t_meanr"] == pytest.approx(i2t.mean())


def test_logit_scale_is_learnt_with_infonce_and_scales_the_logits() -> None:
    hinge = tiny_model("vit")
    assert not hinge.logit_scale.requires_grad
    assert hinge.temperature_scale().item() == pytest.approx(1 / hinge.config.infonce_temperature)
    model = tiny_model("vit", contrastive_loss="infonce", infonce_temperature=0.07)
    assert model.logit_scale.requires_grad
    output = model(**image_inputs("vit", batch=4), **text_inputs(batch=4), return_loss=True)
    output.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    torch.testing.assert_close(output.logits_per_image, output.level_scores.new_tensor(1 / 0.07) * (
        model.score(output.image_outputs, output.text_outputs)))  # fmt: skip
    capped = tiny_model("vit", infonce_temperature=1e-4, logit_scale_max=50.0)
    assert capped.temperature_scale().item() == pytest.approx(50.0)


def test_vision_feature_norm_layernorm_normalises_region_features() -> None:
    model = tiny_model(None, vision_feature_norm="layernorm").eval()
    inputs = image_inputs(None, batch=2)
    with torch.no_grad():
        shifted = {**inputs, "region_features": inputs["region_features"] * 3.0 + 2.0}
        a, b = model.encode_image(**inputs), model.encode_image(**shifted)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-4, rtol=1e-4)  # invariant to scale and shift
    with pytest.raises(ValueError, match="vision_feature_norm must be one of"):
        tiny_model(None, vision_feature_norm="batchnorm")


def test_early_stopping_and_checkpoint_options(tmp_path) -> None:
    recipe = recipe_from_dict(_micro(tmp_path, epochs=6, early_stopping_patience=1, save_checkpoints=False))
    recipe.optim.lr = 1e-9  # no progress: the first evaluation stays the best
    recipe.model.grm["use_region_prompting"] = False
    result = train(recipe)
    state_history = __import__("json").loads((Path(result.output_dir) / "metrics.json").read_text())[
        "dev_history"
    ]
    assert len(state_history) < 6 and result.final_dir.is_dir()
    assert not (Path(result.output_dir) / "checkpoints").exists()

    kept = recipe_from_dict(_micro(tmp_path / "kept", epochs=3, save_total_limit=2, checkpoint_every_steps=0))
    train(kept)
    assert len(list((Path(kept.output_dir) / "checkpoints").glob("step-*"))) == 2


def test_tower_fingerprint_covers_scalar_buffers() -> None:
    from granalign.training.tower_cache import _fingerprint

    tower = torch.nn.BatchNorm1d(3)  # has a 0-dim `num_batches_tracked` buffer
    before = _fingerprint("image", tower, {}, [], "float16")
    tower.num_batches_tracked += 1
    assert _fingerprint("image", tower, {}, [], "float16") != before


def test_global_level_adds_the_embedding_cosine_to_the_score_and_the_loss_and_the_rerank() -> None:
    from granalign.retrieval.rerank import pair_scores

    plain = tiny_model("vit").eval()
    model = tiny_model("vit", global_level_weight=0.5).eval()
    model.load_state_dict(plain.state_dict())
    pixels, captions = image_inputs("vit", batch=3), text_inputs(batch=4)
    with torch.no_grad():
        images, texts = model.encode_image(**pixels), model.encode_text(**captions)
        expected = plain.score(images, texts) + 0.5 * images.image_embeds @ texts.text_embeds.t()
        torch.testing.assert_close(model.score(images, texts), expected)
        torch.testing.assert_close(
            model(**pixels, **captions).logits_per_image, expected * model.temperature_scale()
        )
        rows, cols = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1])
        torch.testing.assert_close(pair_scores(model, images, texts, rows, cols), expected[rows, cols])
    loss = model.train()(**image_inputs("vit", batch=4), **text_inputs(batch=4), return_loss=True)
    assert "contrastive_global" in loss.loss_terms


def test_cached_flips_read_the_mirror_images_states_seeded_per_item(tmp_path, micro_splits) -> None:
    from PIL import ImageOps

    recipe, split = micro_splits
    processor = build_processor(recipe.model, split)
    model = tiny_model("vit").eval()
    model.text_model.resize_token_embeddings(len(processor.tokenizer))
    images = cache_image_states(model, processor, split, tmp_path, "float32", progress=False)
    mirrored = cache_image_states(model, processor, split, tmp_path, "float32", progress=False, mirrored=True)
    assert mirrored.path == images.path and mirrored.encoded == len(split)  # same store, other items
    again = cache_image_states(model, processor, split, tmp_path, "float32", progress=False, mirrored=True)
    assert again.encoded == 0
    pixels = processor(images=[ImageOps.mirror(im) for im in split[:3]["image"]], return_tensors="pt")
    with torch.no_grad():
        expected = model.vision_tower_states(pixels["pixel_values"])
    torch.testing.assert_close(mirrored.batch([0, 1, 2])[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(images.batch([0])[0], mirrored.batch([0])[0])

    pairs = CaptionPairDataset(split, seed=3, load_images=False, cached_flip_prob=0.5)
    flags = [pairs[i]["flipped"] for i in range(len(pairs))]
    assert 0 < sum(flags) < len(flags) and flags == [pairs[i]["flipped"] for i in range(len(pairs))]
    pairs.set_epoch(1)
    assert flags != [pairs[i]["flipped"] for i in range(len(pairs))]  # a new draw each epoch
    first_flipped, first_plain = flags.index(True), flags.index(False)
    pairs.set_epoch(0)
    items = [pairs[first_flipped], pairs[first_plain]]
    collate = AlignmentCollator(processor, image_states=images, mirrored_image_states=mirrored)
    got = collate(items)["vision_hidden_states"]
    torch.testing.assert_close(got[0], mirrored.batch([items[0]["image_index"]])[0][0])
    torch.testing.assert_close(got[1], images.batch([items[1]["image_index"]])[0][0])
    with pytest.raises(ValueError, match="no mirrored image states"):
        AlignmentCollator(processor, image_states=images)(items)
    with pytest.raises(ValueError, match="needs load_images=False"):
        CaptionPairDataset(split, cached_flip_prob=0.5)


def test_training_with_cached_flips_caches_the_training_mirror_images_only(tmp_path) -> None:
    import json

    from granalign.training.tower_cache import image_keys

    recipe = _micro(tmp_path, epochs=1)
    thawed = {**recipe, "model": {**recipe["model"], "freeze_vision_tower": False}}
    with pytest.raises(ValueError, match=r"augment\.cache_flipped_images .* model\.freeze_vision_tower"):
        recipe_from_dict({**thawed, "augment": {"cache_flipped_images": True}}).validate()
    recipe["augment"] = {"cache_flipped_images": True, "horizontal_flip_prob": 0.5}
    parsed = recipe_from_dict(recipe)
    train(parsed)
    (store,) = (tmp_path / "cache").glob("image-*")
    stored = {key for shard in store.glob("shard-*") for key in json.loads((shard / "keys.json").read_text())}
    splits = load_recipe_splits(parsed.data)[:3]
    train_keys, *other_keys = (set(image_keys(split)) for split in splits)
    assert {key for key in stored if key.startswith("mirror:")} == {f"mirror:{key}" for key in train_keys}
    assert {key for key in stored if not key.startswith("mirror:")} == train_keys.union(*other_keys)
