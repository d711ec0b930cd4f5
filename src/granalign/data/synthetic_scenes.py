"""Plain-data compositional scenes: objects, their geometry, and captions that are true by construction.

A `Scene` is a tuple of `SceneObject`s in relative coordinates (x to the right, y downwards, both in
`[0, 1]`). Every object lies inside the axis-aligned box `center ± radius`. Positions (a 3×3 grid of
named cells) and spatial relations (box-disjointness along an axis) are derived from the coordinates.

Captions are realised from *facts*: `ObjectFact` ("a large red circle on the left"), `RelationFact`
("a red ball to the left of a blue box") and `SceneFact` ("a red circle, a small blue square and a green
star", the exhaustive inventory). `fact_holds(fact, scene)` checks any fact against any scene, so the
truth of every caption, and whether a caption tells two scenes apart, can be tested directly.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

__all__ = [
    "COLOURS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SHAPE_NOUNS",
    "SIZES",
    "SIZE_WORDS",
    "Caption",
    "Fact",
    "ObjectFact",
    "ObjectPhrase",
    "RelationFact",
    "Scene",
    "SceneFact",
    "SceneObject",
    "caption_scene",
    "fact_holds",
    "position_of",
    "realise_fact",
    "relation_holds",
    "relations_between",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (245, 220, 50),
    "purple": (165, 70, 215),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GRID = 3
# Row-major names of the 3×3 grid cells; `position_of` maps a centre to one of them.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

# Paraphrases: synonyms for nouns and sizes, several wordings for positions and relations.
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
}
OBJECT_TEMPLATES: tuple[str, ...] = ("{np}", "there is {np}", "an image with {np}", "a picture showing {np}")
RELATION_TEMPLATES: tuple[str, ...] = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")
SCENE_TEMPLATES: tuple[str, ...] = (
    "{list}", "an image with {list}", "a scene with {list}",
    "{count} shapes: {list}", "{count} objects: {list}",
)  # fmt: skip
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SceneObject:
    """One shape. `center` = (x, y) in [0, 1] (y down); the shape lies in the box `center ± radius`."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour {self.colour!r} is not one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {SIZES}")
        if len(self.center) != 2 or not all(0.0 <= c <= 1.0 for c in self.center):
            raise ValueError(f"center {self.center!r} must be a pair (x, y) with both in [0, 1]")
        if not 0.0 < self.radius <= 0.5:
            raise ValueError(f"radius {self.radius!r} must be in (0, 0.5] (a fraction of the image side)")

    @property
    def combination(self) -> tuple[str, str]:
        """The `(colour, shape)` pair, the unit of the compositional hold-out."""
        return (self.colour, self.shape)

    @property
    def position(self) -> str:
        """The named grid cell holding the centre, one of `POSITIONS`."""
        return position_of(self.center)

    def box(self, image_size: int) -> tuple[float, float, float, float]:
        """Bounding box `(x0, y0, x1, y1)` in pixels of an `image_size`-pixel square image."""
        x, y = self.center
        r = self.radius
        return ((x - r) * image_size, (y - r) * image_size, (x + r) * image_size, (y + r) * image_size)


@dataclass(frozen=True)
class Scene:
    """Objects on a background of RGB colour `background`, with luminance noise when `texture_seed` is set."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (45, 45, 45)
    texture_seed: int | None = None

    @property
    def combinations(self) -> tuple[tuple[str, str], ...]:
        """The `(colour, shape)` pair of each object, in object order."""
        return tuple(obj.combination for obj in self.objects)


def position_of(center: tuple[float, float]) -> str:
    """Name of the 3×3 grid cell that holds `center` (relative coordinates, y down)."""
    column, row = (min(int(c * GRID), GRID - 1) for c in center)
    return POSITIONS[row * GRID + column]


def relation_holds(subject: SceneObject, reference: SceneObject, relation: str) -> bool:
    """Whether `subject` is `relation` `reference`: their boxes are disjoint along that axis, in order."""
    (sx, sy), (rx, ry) = subject.center, reference.center
    gap = subject.radius + reference.radius
    if relation == "left of":
        return rx - sx > gap
    if relation == "right of":
        return sx - rx > gap
    if relation == "above":
        return ry - sy > gap
    if relation == "below":
        return sy - ry > gap
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")


def relations_between(subject: SceneObject, reference: SceneObject) -> tuple[str, ...]:
    """All of `RELATIONS` that hold from `subject` to `reference`."""
    return tuple(rel for rel in RELATIONS if relation_holds(subject, reference, rel))


@dataclass(frozen=True)
class ObjectPhrase:
    """A description of one object; `size`/`position` of `None` leave that attribute unsaid."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether `obj` fits every attribute this phrase names."""
        return (
            obj.combination == (self.colour, self.shape)
            and self.size in (None, obj.size)
            and self.position in (None, obj.position)
        )


@dataclass(frozen=True)
class ObjectFact:
    """ "There is <target>": holds when some object matches."""

    target: ObjectPhrase


@dataclass(frozen=True)
class RelationFact:
    """ "<subject> <relation> <reference>": holds for some pair of distinct matching objects."""

    subject: ObjectPhrase
    relation: str
    reference: ObjectPhrase


@dataclass(frozen=True)
class SceneFact:
    """The exhaustive inventory: the phrases match the scene's objects one to one."""

    objects: tuple[ObjectPhrase, ...]


Fact = Union[ObjectFact, RelationFact, SceneFact]  # noqa: UP007 (a runtime alias; py3.10 has no `type`)


@dataclass(frozen=True)
class Caption:
    """A caption's `text`, the `fact` it states, and its granularity (`scene`, `object` or `relation`)."""

    text: str
    fact: Fact
    granularity: str


def fact_holds(fact: Fact, scene: Scene) -> bool:
    """Whether `fact` is true of `scene`."""
    objects = scene.objects
    if isinstance(fact, ObjectFact):
        return any(fact.target.matches(obj) for obj in objects)
    if isinstance(fact, RelationFact):
        return any(
            fact.subject.matches(a) and fact.reference.matches(b) and relation_holds(a, b, fact.relation)
            for a, b in itertools.permutations(objects, 2)
        )
    if isinstance(fact, SceneFact):
        if len(fact.objects) != len(objects):
            return False
        return any(
            all(p.matches(o) for p, o in zip(fact.objects, perm, strict=True))
            for perm in itertools.permutations(objects)
        )
    raise ValueError(f"fact must be an ObjectFact, RelationFact or SceneFact, got {type(fact).__name__}")


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun_phrase(phrase: ObjectPhrase, rng: random.Random) -> str:
    words = [rng.choice(SIZE_WORDS[phrase.size])] if phrase.size else []
    words += [phrase.colour, rng.choice(SHAPE_NOUNS[phrase.shape])]
    text = _with_article(" ".join(words))
    if phrase.position:
        text += " " + rng.choice(POSITION_PHRASES[phrase.position])
    return text


def realise_fact(fact: Fact, rng: random.Random) -> str:
    """One wording of `fact`, with synonyms and template chosen by `rng` (lower case, no full stop)."""
    if isinstance(fact, ObjectFact):
        return rng.choice(OBJECT_TEMPLATES).format(np=_noun_phrase(fact.target, rng))
    if isinstance(fact, RelationFact):
        return rng.choice(RELATION_TEMPLATES).format(
            a=_noun_phrase(fact.subject, rng),
            rel=rng.choice(RELATION_PHRASES[fact.relation]),
            b=_noun_phrase(fact.reference, rng),
        )
    if isinstance(fact, SceneFact):
        nps = [_noun_phrase(p, rng) for p in fact.objects]
        listing = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
        count = NUMBER_WORDS[len(nps)] if len(nps) < len(NUMBER_WORDS) else str(len(nps))
        templates = SCENE_TEMPLATES if len(nps) > 1 else SCENE_TEMPLATES[:3]
        return rng.choice(templates).format(list=listing, count=count)
    raise ValueError(f"fact must be an ObjectFact, RelationFact or SceneFact, got {type(fact).__name__}")


def _object_fact(obj: SceneObject, rng: random.Random) -> ObjectFact:
    size = obj.size if rng.random() < 0.5 else None
    position = obj.position if rng.random() < 0.4 else None
    return ObjectFact(ObjectPhrase(obj.colour, obj.shape, size, position))


def _relation_fact(
    scene: Scene, rng: random.Random, relations: Sequence[tuple[int, int, str]], focus: Sequence[int]
) -> RelationFact | None:
    triples = [(i, j, rel) for i, j, rel in relations if not focus or i in focus or j in focus]
    if not triples:
        return None
    i, j, rel = rng.choice(triples)
    a, b = scene.objects[i], scene.objects[j]
    return RelationFact(
        ObjectPhrase(a.colour, a.shape, a.size if rng.random() < 0.3 else None),
        rel,
        ObjectPhrase(b.colour, b.shape, b.size if rng.random() < 0.3 else None),
    )


def _scene_fact(scene: Scene, rng: random.Random) -> SceneFact:
    order = list(scene.objects)
    rng.shuffle(order)
    return SceneFact(
        tuple(ObjectPhrase(o.colour, o.shape, o.size if rng.random() < 0.5 else None) for o in order)
    )


def caption_scene(
    scene: Scene, rng: random.Random, num_captions: int = 5, focus: Sequence[int] = ()
) -> list[Caption]:
    """`num_captions` distinct true captions of `scene`: one scene-level, then object and relation ones.

    Captions state distinct facts where the scene offers enough of them, else paraphrase one.

    `focus` (object indices, e.g. the two objects of an attribute swap) makes the first object caption
    and the first relation caption (where one exists) name one of those objects.
    """
    if num_captions < 1:
        raise ValueError(f"num_captions must be >= 1, got {num_captions}")
    if not scene.objects:
        raise ValueError("cannot caption a scene without objects")
    if any(not 0 <= i < len(scene.objects) for i in focus):
        raise ValueError(f"focus {tuple(focus)} holds indices outside 0..{len(scene.objects) - 1}")
    plan = ["scene"] + ["object", "relation"] * num_captions
    captions: list[Caption] = []
    seen: set[str] = set()
    seen_facts: set[Fact] = set()
    relations = [
        (i, j, rel)
        for i, j in itertools.permutations(range(len(scene.objects)), 2)
        for rel in relations_between(scene.objects[i], scene.objects[j])
    ]
    focused = {"object": bool(focus), "relation": bool(focus)}
    for kind in plan:
        if len(captions) == num_captions:
            break
        for attempt in range(60):
            if kind == "scene":
                fact: Fact | None = _scene_fact(scene, rng)
            elif kind == "object":
                pool = focus if focused["object"] else range(len(scene.objects))
                fact = _object_fact(scene.objects[rng.choice(list(pool))], rng)
            else:
                fact = _relation_fact(scene, rng, relations, focus if focused["relation"] else ())
                if fact is None and focused["relation"]:  # no relation touches the focus objects
                    focused["relation"] = False
                    fact = _relation_fact(scene, rng, relations, ())
            if fact is None:
                break
            text = realise_fact(fact, rng)
            if text not in seen and (fact not in seen_facts or attempt >= 40):  # prefer new content
                seen.add(text)
                seen_facts.add(fact)
                captions.append(Caption(text, fact, kind))
                focused[kind] = False
                break
    if len(captions) < num_captions:
        raise ValueError(
            f"could not find {num_captions} distinct captions for a scene of {scene.combinations}"
        )
    return captions
