"""Property-based tests: random values, shapes and byte-level corruptions of what users hand us give either
a correct result or one of our clear errors (`ValueError`, `OSError` and their subclasses, `RecipeError`
included), never another exception type from deep inside YAML, safetensors, JSON or torch."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_configs import image_inputs, text_inputs, tiny_model

from granalign.retrieval import GalleryIndex
from granalign.training.recipe import load_recipe

TINY_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
CLEAR_ERRORS = (ValueError, OSError)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# recipe keys that exist, so the values (not only the key check) are exercised
KEYS = [
    "seed", "name", "output_dir", "data.source", "data.args", "data.num_workers", "model.max_length",
    "model.embed_dim", "model.grm.margin", "model.grm.level_weights", "model.grm.num_regions",
    "model.grm.contrastive_loss", "model.freeze_text_tower", "optim.lr", "optim.betas", "optim.milestones",
    "optim.schedule", "train.epochs", "train.batch_size", "train.grad_clip", "train.early_stopping_patience",
    "augment.image_crop_scale", "eval.protocol", "eval.batch_size",
]  # fmt: skip


def _yaml_value(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_recipe_overrides_give_a_recipe_or_a_clear_error(overrides):
    with contextlib.suppress(CLEAR_ERRORS):
        load_recipe(TINY_RECIPE, [f"{key}={_yaml_value(value)}" for key, value in overrides])


@SETTINGS
@given(st.data())
def test_corrupted_recipe_files_give_a_recipe_or_a_clear_error(tmp_path, data):
    original = TINY_RECIPE.read_bytes()
    corrupted = _corrupt(original, data)
    path = tmp_path / "recipe.yaml"
    path.write_bytes(corrupted)
    with contextlib.suppress(CLEAR_ERRORS):
        load_recipe(path)


def _corrupt(original: bytes, data: st.DataObject) -> bytes:
    """Truncate, overwrite a span with random bytes, or splice random bytes in."""
    kind = data.draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    at = data.draw(st.integers(0, len(original)))
    if kind == "truncate":
        return original[:at]
    noise = data.draw(st.binary(min_size=1, max_size=16))
    if kind == "overwrite":
        return original[:at] + noise + original[at + len(noise) :]
    return original[:at] + noise + original[at:]


@pytest.fixture(scope="module")
def index_bytes(tmp_path_factory) -> bytes:
    model = tiny_model(None).eval()
    with torch.no_grad():
        images = model.encode_image(**image_inputs(None, batch=3))
    path = tmp_path_factory.mktemp("index") / "g.safetensors"
    GalleryIndex.build(model, images, ids=["a", "b", "c"]).save(path)
    return path.read_bytes()


@SETTINGS
@given(st.data())
def test_corrupted_index_files_load_checked_or_give_a_clear_error(tmp_path, index_bytes, data):
    path = tmp_path / "g.safetensors"
    path.write_bytes(_corrupt(index_bytes, data))
    try:
        index = GalleryIndex.load(path)
    except CLEAR_ERRORS:
        return
    for name in ("tokens", "keep_weights", "region_tokens", "image_embeds"):  # what loads is sound
        assert bool(torch.isfinite(getattr(index.outputs, name).float()).all())
    assert len(index.ids) == index.outputs.tokens.shape[0]


@SETTINGS
@given(
    batch=st.integers(1, 3),
    regions=st.integers(1, 5),
    width=st.integers(1, 30),
    mask_value=st.sampled_from([0, 1, 2, -1, 0.5, math.nan]),
    feature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool]),
)
def test_model_inputs_give_scores_or_a_clear_error(batch, regions, width, mask_value, feature, dtype):
    model = _REGION_MODEL
    features = torch.randn(batch, regions, width)
    features[0, -1, 0] = feature
    mask = torch.ones(batch, regions)
    mask[0, -1] = mask_value
    try:
        with torch.no_grad():
            image = model.encode_image(region_features=features.to(dtype), region_mask=mask)
            scores = model.score(image, model.encode_text(**text_inputs(batch=2)))
    except CLEAR_ERRORS:
        return
    assert scores.shape == (batch, 2) and bool(torch.isfinite(scores).all())


_REGION_MODEL = tiny_model(None).eval()
