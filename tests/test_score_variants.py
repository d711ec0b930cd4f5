"""Every model variant scores the same through every path: `model.score`, the gathered-pair re-rank, the
region first stage, two-stage search over a shortlist covering the whole gallery (both directions), the
two-stage score matrix and a saved gallery index, each against `model.score` or the per-pair reference.

The variants are `ABLATION_VARIANTS` (no adapters, no region prompting, no uncertainty, the mean-pooled
global baseline), the global level (`global_level_weight=0.5`) and mean pooling with regions.
"""

from __future__ import annotations

import pytest
import torch
from reference_scoring import reference_levels, reference_scores
from tiny_configs import image_inputs, text_inputs, tiny_model

from granalign.configuration_granalign import ABLATION_VARIANTS
from granalign.retrieval import (
    GalleryIndex,
    exhaustive_topk,
    pair_level_scores,
    pair_scores,
    region_level_scores,
    search,
    two_stage_scores,
    two_stage_topk,
)
from granalign.retrieval.matrix import DIRECTIONS

VARIANTS = {
    **ABLATION_VARIANTS,
    "global_level": {"global_level_weight": 0.5},
    "mean_pooling_with_regions": {"similarity_pooling": "mean"},
}
NUM_IMAGES, NUM_TEXTS = 6, 9
CASES = [(name, vision) for name in VARIANTS for vision in ("vit", None)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{name}-{vision or 'regions'}" for name, vision in CASES])
def encoded(request):
    name, vision = request.param
    model = tiny_model(vision, seed=1, **VARIANTS[name]).eval()
    with torch.no_grad():
        images = model.encode_image(**image_inputs(vision, batch=NUM_IMAGES, seed=2))
        texts = model.encode_text(**text_inputs(batch=NUM_TEXTS, seed=3))
    return model, images, texts


def _sources(images):
    """The first stages these images support: the region level needs region tokens."""
    return ("regions", "embeddings") if images.region_tokens is not None else ("embeddings",)


def _pooling(model):
    config = model.config
    return {"negative_slope": config.similarity_negative_slope, "pooling": config.similarity_pooling}


def test_variants_cover_what_the_issue_names():
    assert {"no_region_prompting", "global_baseline"} <= set(VARIANTS)
    assert VARIANTS["global_baseline"]["similarity_pooling"] == "mean"


def test_score_equals_the_per_pair_reference(encoded):
    model, images, texts = encoded
    expected = reference_scores(model.config, images, texts)
    for chunks in ({}, {"image_chunk_size": 2, "text_chunk_size": 4}):
        torch.testing.assert_close(model.score(images, texts, **chunks), expected, atol=1e-5, rtol=1e-5)
    levels = reference_levels(images, texts, **{"slope": model.config.similarity_negative_slope,
                                                "pooling": model.config.similarity_pooling})  # fmt: skip
    torch.testing.assert_close(model.level_scores(images, texts, 2, 4), levels, atol=1e-5, rtol=1e-5)


def test_pair_levels_and_scores_equal_the_reference_and_the_score(encoded):
    model, images, texts = encoded
    generator = torch.Generator().manual_seed(0)
    image_index = torch.randint(NUM_IMAGES, (31,), generator=generator)
    text_index = torch.randint(NUM_TEXTS, (31,), generator=generator)
    config = model.config
    expected = reference_levels(images, texts, config.similarity_negative_slope, config.similarity_pooling)
    for pair_chunk_size in (1, 4, 1000):
        levels = pair_level_scores(
            images, texts, image_index, text_index, pair_chunk_size=pair_chunk_size, **_pooling(model)
        )
        torch.testing.assert_close(levels, expected[:, image_index, text_index], atol=1e-5, rtol=1e-5)
    full = model.score(images, texts)
    torch.testing.assert_close(
        pair_scores(model, images, texts, image_index, text_index, pair_chunk_size=4),
        full[image_index, text_index],
    )
    torch.testing.assert_close(  # the config alone is enough
        pair_scores(model.config, images, texts, image_index, text_index), full[image_index, text_index]
    )


def test_region_first_stage_is_the_uncertainty_level_or_refused(encoded):
    model, images, texts = encoded
    if images.region_tokens is None:
        with pytest.raises(ValueError, match=r"no region tokens.*shortlist_by='embeddings'"):
            region_level_scores(images, texts, **_pooling(model))
        return
    scores = region_level_scores(images, texts, image_chunk_size=2, text_chunk_size=4, **_pooling(model))
    torch.testing.assert_close(scores, model.level_scores(images, texts)[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_two_stage_search_over_the_whole_gallery_equals_the_score(encoded, direction):
    model, images, texts = encoded
    full = model.score(images, texts)
    if direction == "t2i":  # caption queries over the images
        gallery, queries, expected = images, texts, full.t()
    else:  # image queries over the captions
        gallery, queries, expected = texts, images, full
    size = expected.shape[1]
    best = expected.topk(size, dim=1)
    for source in _sources(images):
        scores, rows = two_stage_topk(
            model, gallery, queries, k=size, shortlist=size, shortlist_by=source, pair_chunk_size=5
        )
        torch.testing.assert_close(scores, best.values)
        assert torch.equal(rows, best.indices), source
    scores, rows = exhaustive_topk(model, gallery, queries, k=size, gallery_chunk_size=4)
    torch.testing.assert_close(scores, best.values)
    assert torch.equal(rows, best.indices)
    if images.region_tokens is None:  # refused up front, not a crash deep in the kernel
        with pytest.raises(ValueError, match="use_region_prompting=False"):
            two_stage_topk(model, gallery, queries, k=2, shortlist=size, shortlist_by="regions")


def test_two_stage_matrix_with_whole_shortlists_equals_the_score(encoded):
    model, images, texts = encoded
    full = model.score(images, texts)
    for source in _sources(images):
        for direction in DIRECTIONS:
            scores = two_stage_scores(
                model, images, texts, shortlist=NUM_TEXTS, direction=direction, shortlist_by=source
            )
            torch.testing.assert_close(scores, full)
    if images.region_tokens is None:
        with pytest.raises(ValueError, match="no region tokens"):
            two_stage_scores(model, images, texts, shortlist=2, shortlist_by="regions")


def test_search_through_saved_indices_both_ways(encoded, tmp_path):
    model, images, texts = encoded
    full = model.score(images, texts)
    image_ids, text_ids = [f"i{n}" for n in range(NUM_IMAGES)], [f"t{n}" for n in range(NUM_TEXTS)]
    image_index = GalleryIndex.load(GalleryIndex.build(model, images, image_ids).save(tmp_path / "i.st"))
    text_index = GalleryIndex.load(GalleryIndex.build(model, texts, text_ids).save(tmp_path / "t.st"))
    assert (image_index.outputs.region_tokens is None) == (images.region_tokens is None)
    for index, queries, expected, ids in (
        (image_index, texts, full.t(), image_ids),
        (text_index, images, full, text_ids),
    ):
        best = expected.topk(3, dim=1)
        want = [[ids[int(r)] for r in row] for row in best.indices]
        runs = [{"mode": "exhaustive"}]
        runs += [{"shortlist": len(ids), "shortlist_by": source} for source in _sources(images)]
        for options in runs:
            result = search(model, index, queries, k=3, **options)
            assert result.ids == want, options
            torch.testing.assert_close(result.scores, best.values)


def test_an_index_does_not_mix_items_with_and_without_regions(tmp_path):
    with_regions = tiny_model(None, seed=1).eval()
    without = tiny_model(None, seed=1, use_region_prompting=False).eval()
    with torch.no_grad():
        images = with_regions.encode_image(**image_inputs(None, batch=2))
        plain = without.encode_image(**image_inputs(None, batch=2))
    index = GalleryIndex.build(without, plain, ["a", "b"])
    with pytest.raises(ValueError, match="must come from one model"):
        index.add(images, ["c", "d"])
    assert GalleryIndex.load(index.save(tmp_path / "g.st")).metadata()["region_tokens"] == "absent"
