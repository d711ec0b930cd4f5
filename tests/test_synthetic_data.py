"""The built-in synthetic scenes: schema, determinism, caption truth, twins and the compositional hold-out."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest
from datasets import Image as ImageFeature

from granalign.data.schema import image_features, validate_dataset_dict
from granalign.data.synthetic import (
    SyntheticSceneSpec,
    build_synthetic_scenes,
    generate_synthetic_scenes,
    held_out_combinations,
    render_scene,
    sample_scene,
    swap_colours,
)
from granalign.data.synthetic_scenes import (
    COLOURS,
    SHAPE_NOUNS,
    SHAPES,
    SIZE_WORDS,
    ObjectFact,
    ObjectPhrase,
    RelationFact,
    Scene,
    SceneFact,
    SceneObject,
    caption_scene,
    fact_holds,
    position_of,
    relations_between,
)

SMALL = {"num_train": 24, "num_validation": 6, "num_test": 10}

# --- an independent reading of caption text (regexes over the words, geometry from coordinates) ---
NOUN_TO_SHAPE = {noun: shape for shape, nouns in SHAPE_NOUNS.items() for noun in nouns}
WORD_TO_SIZE = {word: size for size, words in SIZE_WORDS.items() for word in words}
_ALT = "|".join
MENTION = (
    rf"an? (?:({_ALT(WORD_TO_SIZE)}) )?({_ALT(COLOURS)}) "
    rf"({_ALT(sorted(NOUN_TO_SHAPE, key=len, reverse=True))})"
)
RELATION_WORDS = {
    "to the left of": "left", "left of": "left", "on the left of": "left",
    "to the right of": "right", "right of": "right", "on the right of": "right",
    "above": "above", "over": "above", "higher than": "above",
    "below": "below", "under": "below", "beneath": "below",
}  # fmt: skip
RELATION_RE = re.compile(
    rf"^(?:there is )?({MENTION}) (?:is )?"
    rf"({_ALT(sorted(RELATION_WORDS, key=len, reverse=True))}) ({MENTION})$"
)
OBJECT_RE = re.compile(
    rf"^(?:there is |an image with |a picture showing )?({MENTION})"
    r"(?: ((?:in|at|on) the (?:top |bottom )?(?:left|right|centre|middle|top|bottom)(?: corner| side)?))?$"
)


def _mentions(text: str) -> list[tuple[str | None, str, str]]:
    """(size or None, colour, shape) for every "a [size] colour noun" in `text`."""
    return [
        (WORD_TO_SIZE.get(size), colour, NOUN_TO_SHAPE[noun])
        for size, colour, noun in re.findall(MENTION, text)
    ]


def _fits(mention: tuple[str | None, str, str], obj: SceneObject) -> bool:
    size, colour, shape = mention
    return (colour, shape) == (obj.colour, obj.shape) and size in (None, obj.size)


def _cell_of_phrase(phrase: str) -> tuple[int, int]:
    words = phrase.split()
    column = 0 if "left" in words else 2 if "right" in words else 1
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    return column, row


def _geometric(a: SceneObject, b: SceneObject, relation: str) -> bool:
    (ax, ay), (bx, by), gap = a.center, b.center, a.radius + b.radius
    return {"left": ax + gap < bx, "right": bx + gap < ax, "above": ay + gap < by, "below": by + gap < ay}[
        relation
    ]


def _check_caption_text(text: str, granularity: str, scene: Scene) -> None:
    objects = scene.objects
    mentions = _mentions(text)
    assert mentions, text
    for mention in mentions:
        assert any(_fits(mention, obj) for obj in objects), (text, scene.combinations)
    if granularity == "scene":
        assert sorted(m[1:] for m in mentions) == sorted(scene.combinations), text
    elif granularity == "relation":
        match = RELATION_RE.match(text)
        assert match, text
        (subject,), (reference,) = _mentions(match.group(1)), _mentions(match.group(6))
        relation = RELATION_WORDS[match.group(5)]
        assert any(
            _fits(subject, a) and _fits(reference, b) and _geometric(a, b, relation)
            for a, b in itertools.permutations(objects, 2)
        ), (text, [(o.combination, o.center, o.radius) for o in objects])
    else:
        match = OBJECT_RE.match(text)
        assert match, text
        if match.group(5):
            cell = _cell_of_phrase(match.group(5))
            assert any(
                _fits(mentions[0], o) and (int(o.center[0] * 3), int(o.center[1] * 3)) == cell
                for o in objects
            ), (text, [(o.combination, o.center) for o in objects])


@pytest.fixture(scope="module")
def default_scenes():
    """The README's default dataset as plain data (no pixels)."""
    return generate_synthetic_scenes()


@pytest.fixture(scope="module")
def small_dataset():
    return build_synthetic_scenes(**SMALL, seed=3)


def test_schema_split_sizes_and_ids(small_dataset):
    validate_dataset_dict(small_dataset)
    assert list(small_dataset) == ["train", "validation", "test"]
    assert {s: len(small_dataset[s]) for s in small_dataset} == {"train": 24, "validation": 6, "test": 10}
    ids = [i for split in small_dataset.values() for i in split["image_id"]]
    assert len(set(ids)) == len(ids)
    for split in small_dataset.values():
        assert split.features == image_features()
        assert "held out of train" in split.info.description
    assert list(build_synthetic_scenes(num_train=3, num_validation=0, num_test=2)) == ["train", "test"]


def test_five_distinct_captions_per_image(small_dataset, default_scenes):
    for split in small_dataset.values():
        for captions in split["captions"]:
            assert len(captions) == 5 and len(set(captions)) == 5
    for records in default_scenes.splits.values():
        for record in records:
            assert len(set(record.caption_texts)) == 5
            assert Counter(c.granularity for c in record.captions)["scene"] == 1


def test_images_have_requested_size_mode_and_content(small_dataset):
    for row in small_dataset["train"].select(range(8)):
        image = row["image"]
        assert image.mode == "RGB" and image.size == (64, 64)
        assert np.asarray(image, dtype=np.float32).std() > 10.0
    larger = build_synthetic_scenes(num_train=2, num_validation=0, num_test=0, image_size=96)
    assert larger["train"][0]["image"].size == (96, 96)


def _raw(dataset):
    return {
        name: (split.cast_column("image", ImageFeature(decode=False))["image"], split["captions"])
        for name, split in dataset.items()
    }


def test_same_seed_is_byte_identical_and_other_seed_differs(small_dataset):
    first, again = _raw(small_dataset), _raw(build_synthetic_scenes(**SMALL, seed=3))
    assert [i["bytes"] for i in first["train"][0]] == [i["bytes"] for i in again["train"][0]]
    assert first == again
    other = _raw(build_synthetic_scenes(**SMALL, seed=4))
    for split in first:
        assert first[split][1] != other[split][1]
        assert {i["bytes"] for i in first[split][0]}.isdisjoint(i["bytes"] for i in other[split][0])


def test_dataset_matches_its_plain_data_and_rendering(small_dataset):
    scenes = generate_synthetic_scenes(SyntheticSceneSpec(**SMALL, seed=3))
    for split, records in scenes.splits.items():
        assert small_dataset[split]["captions"] == [r.caption_texts for r in records]
        assert small_dataset[split]["image_id"] == [r.image_id for r in records]
    row, record = small_dataset["test"][0], scenes.splits["test"][0]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(render_scene(record.scene, 64)))


def test_every_caption_is_true_of_its_scene(default_scenes):
    for records in default_scenes.splits.values():
        for record in records:
            for caption in record.captions:
                assert fact_holds(caption.fact, record.scene), (caption, record.scene)
                _check_caption_text(caption.text, caption.granularity, record.scene)


def test_captions_mix_granularities_and_paraphrases(default_scenes):
    captions = [c for r in default_scenes.splits["train"] for c in r.captions]
    assert Counter(c.granularity for c in captions).keys() == {"scene", "object", "relation"}
    words = Counter(w for c in captions for w in c.text.split())
    for synonym in ("ball", "circle", "box", "square", "big", "large", "above", "below", "left", "right"):
        assert words[synonym] > 0, synonym


def _obj(colour, shape, x, y, size="large", radius=0.1):
    return SceneObject(shape, colour, size, (x, y), radius)


def test_positions_and_relations_follow_coordinates():
    assert position_of((0.1, 0.1)) == "top left" and position_of((0.5, 0.5)) == "centre"
    assert position_of((0.9, 0.5)) == "right" and position_of((1.0, 1.0)) == "bottom right"
    left, right = _obj("red", "circle", 0.2, 0.5), _obj("blue", "square", 0.8, 0.5)
    assert relations_between(left, right) == ("left of",) and relations_between(right, left) == ("right of",)
    top, bottom = _obj("red", "circle", 0.5, 0.15), _obj("blue", "square", 0.55, 0.8)
    assert relations_between(top, bottom) == ("above",) and relations_between(bottom, top) == ("below",)
    overlapping = _obj("blue", "square", 0.35, 0.5)  # boxes overlap in x: neither is left of the other
    assert relations_between(left, overlapping) == ()


def test_fact_holds_checks_every_attribute():
    scene = Scene((_obj("red", "circle", 0.2, 0.5, "large"), _obj("blue", "square", 0.8, 0.5, "small")))
    assert fact_holds(ObjectFact(ObjectPhrase("red", "circle", "large", "left")), scene)
    for wrong in (
        ("blue", "circle", None, None),
        ("red", "circle", "small", None),
        ("red", "circle", None, "right"),
    ):
        assert not fact_holds(ObjectFact(ObjectPhrase(*wrong)), scene), wrong
    red, blue = ObjectPhrase("red", "circle"), ObjectPhrase("blue", "square")
    assert fact_holds(RelationFact(red, "left of", blue), scene)
    assert not fact_holds(RelationFact(blue, "left of", red), scene)
    assert not fact_holds(RelationFact(red, "above", blue), scene)
    assert fact_holds(SceneFact((blue, red)), scene)
    assert not fact_holds(SceneFact((red,)), scene)
    assert not fact_holds(SceneFact((red, ObjectPhrase("blue", "square", "large"))), scene)


def test_sampled_scenes_use_distinct_pairs_in_disjoint_boxes():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(
            rng, 4, [("red", "circle"), ("blue", "star"), ("green", "cross")], [("white", "square")]
        )
        assert len(set(scene.combinations)) == 4 and ("white", "square") in scene.combinations
        assert len({o.position for o in scene.objects}) == 4
        for a, b in itertools.combinations(scene.objects, 2):
            assert relations_between(a, b), "boxes overlap"
        for obj in scene.objects:
            assert all(0 <= v <= 64 for v in obj.box(64))


def test_render_draws_each_object_at_its_coordinates():
    scene = Scene(
        (_obj("red", "circle", 0.25, 0.25), _obj("blue", "square", 0.75, 0.75)), background=(40, 40, 40)
    )
    for supersample in (1, 2):
        pixels = np.asarray(render_scene(scene, 64, supersample)).astype(int)
        assert tuple(pixels[16, 16]) == COLOURS["red"] and tuple(pixels[48, 48]) == COLOURS["blue"]
        assert tuple(pixels[16, 48]) == (40, 40, 40) and tuple(pixels[2, 62]) == (40, 40, 40)
    textured = np.asarray(render_scene(Scene(scene.objects, (40, 40, 40), texture_seed=7), 64)).astype(int)
    assert 0 < textured[:8, 40:].std() < 15


def test_twins_differ_only_by_a_colour_swap(default_scenes):
    for split, records in default_scenes.splits.items():
        by_id = {r.image_id: r for r in records}
        twins = [r for r in records if r.twin_id is not None]
        assert len(twins) == 2 * round(len(records) * 0.3 / 2), split
        for record in twins:
            twin = by_id[record.twin_id]
            assert twin.twin_id == record.image_id and twin.swapped == record.swapped
            i, j = record.swapped
            assert swap_colours(record.scene, i, j) == twin.scene
            a, b = record.scene.objects[i], record.scene.objects[j]
            assert a.colour != b.colour and a.shape != b.shape
            # The scene caption and a caption naming a swapped object (colour bound to shape) are false
            # of the twin, in the facts and in the words.
            false_in_twin = [c for c in record.captions if not fact_holds(c.fact, twin.scene)]
            assert {"scene", "object"} <= {c.granularity for c in false_in_twin}
            assert any(
                {m[1:] for m in _mentions(c.text)} - set(twin.scene.combinations)
                for c in record.captions
                if c.granularity != "scene"
            )


def test_twin_images_differ_only_inside_the_swapped_objects(default_scenes):
    records = default_scenes.splits["validation"]
    by_id = {r.image_id: r for r in records}
    for record in [r for r in records if r.twin_id][:6]:
        first = np.asarray(render_scene(record.scene, 64)).astype(int)
        second = np.asarray(render_scene(by_id[record.twin_id].scene, 64)).astype(int)
        inside = np.zeros((64, 64), dtype=bool)
        for index in record.swapped:
            x0, y0, x1, y1 = record.scene.objects[index].box(64)
            inside[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
            assert np.abs(first - second)[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum() > 0
        assert not np.abs(first - second).sum(axis=-1)[~inside].any()


def test_held_out_pairs_keep_every_colour_and_shape_in_training():
    held = held_out_combinations(0)
    assert held == held_out_combinations(0) and len(held) == 4
    assert len({c for c, _ in held}) == len(held) == len({s for _, s in held})
    assert any(held_out_combinations(seed) != held for seed in range(1, 4))
    assert held_out_combinations(0, 0.0) == ()
    most = held_out_combinations(5, 0.5)
    assert len(most) == 15
    assert all(sum((c, s) not in most for s in SHAPES) >= 2 for c in COLOURS)
    assert all(sum((c, s) not in most for c in COLOURS) >= 3 for s in SHAPES)


def test_held_out_pairs_absent_from_train_and_in_every_test_image(default_scenes):
    held = set(default_scenes.held_out)
    assert held == set(held_out_combinations(0))
    train = default_scenes.splits["train"]
    train_pairs = {pair for r in train for pair in r.scene.combinations}
    assert not held & train_pairs
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)
    assert not held & {m[1:] for r in train for text in r.caption_texts for m in _mentions(text)}
    for split in ("validation", "test"):
        for record in default_scenes.splits[split]:
            assert held & set(record.scene.combinations), record.image_id
            assert held & {m[1:] for text in record.caption_texts for m in _mentions(text)}
    assert held <= {pair for r in default_scenes.splits["test"] for pair in r.scene.combinations}


def test_held_out_pairs_absent_from_built_train_captions(small_dataset):
    held = set(held_out_combinations(3))
    assert not held & {
        m[1:] for caps in small_dataset["train"]["captions"] for t in caps for m in _mentions(t)
    }
    for captions in small_dataset["test"]["captions"]:
        assert held & {m[1:] for text in captions for m in _mentions(text)}


def test_caption_scene_names_focus_objects_first():
    scene = Scene(
        (_obj("red", "circle", 0.2, 0.2), _obj("blue", "square", 0.8, 0.2), _obj("green", "star", 0.5, 0.8))
    )
    for seed in range(20):
        captions = caption_scene(scene, random.Random(seed), 5, focus=(2,))
        first_object = next(c for c in captions if c.granularity == "object")
        assert first_object.fact.target.shape == "star"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": -1}, "num_train must be >= 0"),
        ({"num_train": 0, "num_validation": 0, "num_test": 0}, "all 0"),
        ({"image_size": 16}, "image_size must be >= 32"),
        ({"image_size": 64.0}, "image_size must be an int"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects <= max_objects"),
        ({"max_objects": 10}, "max_objects <= 9"),
        ({"min_objects": 1, "max_objects": 1}, "needs max_objects >= 2"),
        ({"twin_fraction": 1.5}, "twin_fraction must be in"),
        ({"held_out_fraction": 0.8}, "held_out_fraction must be in"),
        ({"supersample": 0}, "supersample must be >= 1"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_synthetic_scenes(**kwargs)


def test_invalid_scene_parts_raise_clear_errors():
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        SceneObject("hexagon", "red", "large", (0.5, 0.5), 0.1)
    with pytest.raises(ValueError, match="center"):
        SceneObject("circle", "red", "large", (1.5, 0.5), 0.1)
    scene = Scene((_obj("red", "circle", 0.2, 0.2),))
    with pytest.raises(ValueError, match="two distinct object indices"):
        swap_colours(scene, 0, 0)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        render_scene(scene, 8)
    # one-object scenes still get 5 distinct captions
    assert len({c.text for c in caption_scene(scene, random.Random(0))}) == 5
