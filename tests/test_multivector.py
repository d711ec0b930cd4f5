"""The multi-vector token index (`granalign.retrieval.multivector`): each optimised path against a plain
reference. Small tiny-model galleries; exact FAISS settings; no timing (speed lives in benchmarks/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_configs import image_inputs, text_inputs, tiny_model

from granalign import GranAlignImageOutput
from granalign.retrieval import exhaustive_topk

faiss = pytest.importorskip("faiss")

from granalign.retrieval.multivector import (  # noqa: E402
    TokenIndex,
    aggregate_token_hits,
    build_token_index_distributed,
    centroid_interaction,
    first_stage_query_tokens,
    merge_token_indices,
    select_tokens,
    shard_range,
)

NUM_IMAGES = 12


@pytest.fixture(scope="module", params=["vit", None])
def encoded(request):
    model = tiny_model(request.param, seed=1).eval()
    with torch.no_grad():
        images = model.encode_image(**image_inputs(request.param, batch=NUM_IMAGES, seed=2))
        texts = model.encode_text(**text_inputs(batch=9, seed=3))
    return model, images, texts


def _rows(outputs, rows):
    return type(outputs)(**{name: value[rows] for name, value in outputs.items()})


def _ids(start, stop):
    return [f"img{i}" for i in range(start, stop)]


def _create(path, model, images, **kwargs):
    regions = 0 if images.region_tokens is None else images.region_tokens.shape[1]
    settings = dict(codec="float32", first_stage_tokens=None, faiss_factory="Flat", train_size=16)
    settings.update(kwargs)
    return TokenIndex.create(path, model, dim=images.tokens.shape[-1], num_regions=regions, **settings)


def _everything(index):
    """First-stage settings that retrieve every stored token of every image."""
    return dict(candidates=len(index), token_k=int(index.faiss_index.ntotal))


@pytest.mark.parametrize(("factory", "params"), [("Flat", ""), ("IVF2,Flat", "nprobe=2")])
def test_exhaustive_settings_give_the_exhaustive_ranking(encoded, tmp_path, factory, params):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, faiss_factory=factory)
    index.add(_rows(images, slice(0, 5)), _ids(0, 5)).add(_rows(images, slice(5, None)), _ids(5, NUM_IMAGES))
    index.save()
    index = TokenIndex.open(tmp_path / "i", model=model)
    result = index.search(model, texts, k=6, search_params=params, **_everything(index))
    scores, rows = exhaustive_topk(model, images, texts, k=6)
    assert torch.equal(result.indices, rows)
    torch.testing.assert_close(result.scores, scores, atol=1e-4, rtol=1e-4)
    assert result.ids == [[f"img{int(r)}" for r in row] for row in rows]


def _dense_first_stage(model, images, texts, limit, query_limit=None):
    """Reference: the caption-side weighted LeakyReLU max over each image's `limit` first-stage tokens
    (of each caption's `query_limit` tokens of highest keep weight; all real ones for None)."""
    original, key = model.config.effective_level_weights[:2]
    slope = model.config.similarity_negative_slope
    items, positions = select_tokens(images.token_mask, images.keep_weights, limit)
    scores = torch.empty(texts.tokens.shape[0], images.tokens.shape[0], dtype=torch.float64)
    query_items, query_positions = select_tokens(texts.token_mask, texts.keep_weights, query_limit)
    for q in range(texts.tokens.shape[0]):
        real = torch.zeros(texts.tokens.shape[1], dtype=torch.bool)
        real[query_positions[query_items == q]] = True
        query = F.normalize(texts.tokens[q][real].double(), dim=-1)
        weight = original + key * texts.keep_weights[q][real].double()
        for n in range(images.tokens.shape[0]):
            image = F.normalize(images.tokens[n][positions[items == n]].double(), dim=-1)
            best = F.leaky_relu((query @ image.t()).amax(1), slope)
            scores[q, n] = (weight * best).sum() / weight.sum()
    return scores


@pytest.mark.parametrize(("limit", "query_limit"), [(None, None), (2, None), (None, 3)])
def test_first_stage_equals_the_dense_late_interaction(encoded, tmp_path, limit, query_limit):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, first_stage_tokens=limit)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    scores, rows = index.first_stage(
        texts, config=model.config, query_tokens=query_limit, **_everything(index)
    )
    expected = _dense_first_stage(model, images, texts, limit, query_limit)
    torch.testing.assert_close(scores.double(), expected.gather(1, rows), atol=1e-5, rtol=1e-5)
    assert torch.equal(rows, expected.topk(NUM_IMAGES, dim=1).indices)  # (no ties in these scores)


def _naive_aggregate(sims, images, token_query, token_weight, num_queries, slope):
    """One (query, image) at a time: best retrieved cosine per token, else the token's lowest one."""
    leaky = np.where(sims >= 0, sims, slope * sims)
    scores = {}
    for q in range(num_queries):
        tokens = np.flatnonzero(token_query == q)
        for n in {int(i) for t in tokens for i in images[t] if i >= 0}:
            total = 0.0
            for t in tokens:
                hits = [leaky[t, j] for j in range(images.shape[1]) if images[t, j] == n]
                floor = min(leaky[t, j] for j in range(images.shape[1]) if images[t, j] >= 0)
                total += token_weight[t] * (max(hits) if hits else floor)
            scores[q, n] = total / token_weight[tokens].sum()
    return scores


def test_token_hit_aggregation_equals_the_naive_loop():
    rng = np.random.default_rng(0)
    num_tokens, width, num_images, num_queries = 14, 5, 7, 3
    images = rng.integers(0, num_images, (num_tokens, width))
    images[2, 3:] = -1  # a token that found fewer neighbours
    sims = -np.sort(-rng.uniform(-0.5, 1.0, (num_tokens, width)), axis=1)
    token_query = np.sort(rng.integers(0, num_queries, num_tokens))
    token_weight = rng.uniform(0.1, 1.0, num_tokens)
    scores, rows = aggregate_token_hits(sims, images, token_query, token_weight, num_queries, 4, 0.1)
    expected = _naive_aggregate(sims, images, token_query, token_weight, num_queries, 0.1)
    for q in range(num_queries):
        ranked = sorted((-s, n) for (qq, n), s in expected.items() if qq == q)[:4]
        assert rows[q, : len(ranked)].tolist() == [n for _, n in ranked]
        np.testing.assert_allclose(scores[q, : len(ranked)].numpy(), [-s for s, _ in ranked], rtol=1e-6)
        assert (rows[q, len(ranked) :] == -1).all()


def test_query_tokens_are_the_real_caption_tokens(encoded):
    model, _, texts = encoded
    vectors, query, weight = first_stage_query_tokens(texts, model.config)
    assert len(vectors) == int(texts.token_mask.sum()) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert (np.diff(query) >= 0).all() and (weight > 0).all()


def test_select_tokens_keeps_the_highest_keep_weights():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    keep = torch.tensor([[0.1, 0.9, 0.5, 0.9, 1.0], [0.3, 0.2, 0.9, 0.9, 0.9]])
    items, positions = select_tokens(mask, keep, 2)
    assert items.tolist() == [0, 0, 1, 1] and positions.tolist() == [1, 3, 0, 1]  # padding never chosen
    items, positions = select_tokens(mask, keep, None)
    assert positions.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(("codec", "tolerance"), [("float32", 0.0), ("float16", 2e-3), ("int8", 2e-2)])
def test_the_store_decodes_what_was_added(encoded, tmp_path, codec, tolerance):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, codec=codec)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    rows = torch.tensor([7, 0, 3])
    stored = TokenIndex.open(tmp_path / "i").store.outputs(rows)
    original = _rows(images, rows)
    width = int(original.token_mask.sum(1).max())
    assert torch.equal(stored.token_mask, original.token_mask[:, :width].long())
    real = stored.token_mask.bool()
    unit = F.normalize(stored.tokens[real], dim=-1)  # int8 drops each vector's scale: compare directions
    assert (
        float((unit - F.normalize(original.tokens[:, :width][real], dim=-1)).abs().max()) <= tolerance + 1e-7
    )
    torch.testing.assert_close(
        stored.keep_weights[real], original.keep_weights[:, :width][real], atol=1e-3, rtol=0
    )
    if original.region_tokens is not None:
        regions = F.normalize(stored.region_tokens, dim=-1) - F.normalize(original.region_tokens, dim=-1)
        assert float(regions.abs().max()) <= tolerance + 1e-7
    # reduced precision changes the re-ranked scores only slightly
    full = TokenIndex.open(tmp_path / "i").search(model, texts, k=NUM_IMAGES, **_everything(index))
    exact = exhaustive_topk(model, images, texts, k=NUM_IMAGES)[0]
    torch.testing.assert_close(full.scores, exact, atol=10 * tolerance + 1e-4, rtol=0)


def test_rerank_tokens_keep_only_the_most_kept_tokens(encoded, tmp_path):
    model, images, _ = encoded
    index = _create(tmp_path / "i", model, images, rerank_tokens=3)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    stored = index.store.outputs(torch.arange(NUM_IMAGES))
    items, positions = select_tokens(images.token_mask, images.keep_weights, 3)
    for n in range(NUM_IMAGES):
        expected = images.tokens[n, positions[items == n]]
        got = stored.tokens[n][stored.token_mask[n].bool()]
        torch.testing.assert_close(got, expected)


def test_appending_after_reopening_equals_one_build(encoded, tmp_path):
    model, images, texts = encoded
    one = _create(tmp_path / "one", model, images, faiss_factory="IVF2,Flat")
    one.add(images, _ids(0, NUM_IMAGES)).save()
    # trained on the first chunk (train_size reached), reopened and appended
    two = _create(tmp_path / "two", model, images, faiss_factory="IVF2,Flat", train_size=8)
    two.add(_rows(images, slice(0, 4)), _ids(0, 4)).save()
    two = TokenIndex.open(tmp_path / "two", model=model)
    two.add(_rows(images, slice(4, None)), _ids(4, NUM_IMAGES)).save()
    two = TokenIndex.open(tmp_path / "two")
    assert len(two) == NUM_IMAGES and two.ids == one.ids
    for name in ("tokens", "keep", "lengths", "regions", "embeds"):
        if (one.path / f"{name}.bin").exists():
            assert (one.path / f"{name}.bin").read_bytes() == (two.path / f"{name}.bin").read_bytes()
    settings = dict(search_params="nprobe=2", **_everything(one))
    assert torch.equal(
        one.search(model, texts, k=5, **settings).indices, two.search(model, texts, k=5, **settings).indices
    )
    with pytest.raises(ValueError, match="new and unique"):
        two.add(_rows(images, slice(0, 1)), ["img3"])
    with pytest.raises(FileExistsError):
        _create(tmp_path / "two", model, images)


def test_an_index_of_another_model_is_refused(encoded, tmp_path):
    model, images, _ = encoded
    _create(tmp_path / "i", model, images).add(images, _ids(0, NUM_IMAGES)).save()
    other = tiny_model("vit", seed=5)
    with pytest.raises(ValueError, match="built by model"):
        TokenIndex.open(tmp_path / "i", model=other)


def test_merged_shards_equal_one_build(encoded, tmp_path):
    model, images, texts = encoded
    one = _create(tmp_path / "one", model, images, faiss_factory="IVF2,Flat")
    one.train_first_stage(images)
    one.write_trained(tmp_path / "trained.faiss")
    one.add(images, _ids(0, NUM_IMAGES)).save()
    shards = []
    for shard, rows in enumerate((range(0, 5), range(5, NUM_IMAGES))):
        part = _create(
            tmp_path / f"s{shard}",
            model,
            images,
            faiss_factory="IVF2,Flat",
            trained=tmp_path / "trained.faiss",
        )
        part.add(_rows(images, slice(rows.start, rows.stop)), _ids(rows.start, rows.stop)).save()
        shards.append(part.path)
    merged = merge_token_indices(shards, tmp_path / "merged")
    assert merged.ids == one.ids and merged.faiss_index.ntotal == one.faiss_index.ntotal
    for name in ("tokens", "keep", "lengths", "embeds"):
        assert (one.path / f"{name}.bin").read_bytes() == (merged.path / f"{name}.bin").read_bytes()
    for nprobe in (1, 2):  # the same lists, so the same result even when probing only some
        settings = dict(search_params=f"nprobe={nprobe}", candidates=5, token_k=4)
        a, b = (
            one.search(model, texts, k=3, **settings),
            TokenIndex.open(merged.path).search(model, texts, k=3, **settings),
        )
        assert torch.equal(a.indices, b.indices)


# ------------------------------------------------------------------ the centroid (PLAID) first stage

_CENTROID_NAMES = ("centroids", "centroid_counts", "centroid_lists", "centroid_offsets", "first_stage_codes")


def _centroid_everything(index, nlist):
    """Centroid first-stage settings that keep every image at every step."""
    return dict(mode="centroids", nprobe=nlist, ndocs=len(index), candidates=len(index))


def _token_centroids(index, images, limit):
    """Reference: per image, the coarse centroid of each of its first-stage tokens (FAISS's quantizer)."""
    items, positions = select_tokens(images.token_mask, images.keep_weights, limit)
    vectors = F.normalize(images.tokens[items, positions].float(), dim=-1).numpy()
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assigned = ivf.quantizer.assign(vectors, 1)[:, 0]
    return [sorted(set(assigned[items.numpy() == n].tolist())) for n in range(images.tokens.shape[0])]


@pytest.mark.parametrize(("nlist", "limit", "refine"), [(2, None, 0), (3, 2, 0), (3, None, NUM_IMAGES)])
def test_centroid_mode_with_exhaustive_settings_gives_the_exhaustive_ranking(
    encoded, tmp_path, nlist, limit, refine
):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, faiss_factory=f"IVF{nlist},Flat", first_stage_tokens=limit)
    index.add(_rows(images, slice(0, 5)), _ids(0, 5)).add(_rows(images, slice(5, None)), _ids(5, NUM_IMAGES))
    index.save()
    index = TokenIndex.open(tmp_path / "i", model=model)
    assert index.default_mode == "centroids"
    result = index.search(model, texts, k=6, refine=refine, **_centroid_everything(index, nlist))
    scores, rows = exhaustive_topk(model, images, texts, k=6)
    assert torch.equal(result.indices, rows)
    torch.testing.assert_close(result.scores, scores, atol=1e-4, rtol=1e-4)


def _assert_centroid_interaction(scores, rows, texts, config, centroids, per_image) -> None:
    """Every image is a candidate and its score is the dense centroid interaction: per query token the
    best (LeakyReLU'd) cosine over the image's cells `per_image[n]` of unit `centroids` `[nlist, d]`,
    averaged with the query's level weights."""
    original, key = config.effective_level_weights[:2]
    for q in range(texts.tokens.shape[0]):
        real = texts.token_mask[q].bool()
        query = F.normalize(texts.tokens[q][real].double(), dim=-1)
        weight = original + key * texts.keep_weights[q][real].double()
        cosines = F.leaky_relu(query @ centroids.t(), config.similarity_negative_slope)  # [T, nlist]
        expected = torch.stack([(weight * cosines[:, c].amax(1)).sum() / weight.sum() for c in per_image])
        assert sorted(rows[q].tolist()) == list(range(NUM_IMAGES))
        torch.testing.assert_close(scores[q].double(), expected[rows[q]], atol=1e-5, rtol=1e-5)


def test_centroid_interaction_equals_the_dense_reference(encoded, tmp_path):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, faiss_factory="IVF4,Flat", first_stage_tokens=3)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    scores, rows = index.first_stage(texts, config=model.config, refine=0, **_centroid_everything(index, 4))
    centroids = F.normalize(
        torch.from_numpy(faiss.extract_index_ivf(index.faiss_index).quantizer.reconstruct_n(0, 4)), dim=-1
    ).double()
    per_image = _token_centroids(index, images, 3)
    _assert_centroid_interaction(scores, rows, texts, model.config, centroids, per_image)
    assert bool((scores[:, 1:] <= scores[:, :-1]).all())


def test_centroid_candidates_are_the_images_of_the_probed_lists(encoded, tmp_path):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, faiss_factory="IVF4,Flat", first_stage_tokens=2)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    _, rows = index.first_stage(
        texts, config=model.config, mode="centroids", nprobe=1, ndocs=NUM_IMAGES, candidates=NUM_IMAGES
    )
    per_image = _token_centroids(index, images, 2)
    vectors, token_query, _ = first_stage_query_tokens(texts, model.config)
    probed = faiss.extract_index_ivf(index.faiss_index).quantizer.assign(vectors, 1)[:, 0]
    for q in range(texts.tokens.shape[0]):
        lists = set(probed[token_query == q].tolist())
        expected = {n for n, cs in enumerate(per_image) if lists & set(cs)}
        assert set(rows[q][rows[q] >= 0].tolist()) == expected


def test_centroid_refinement_equals_the_dense_late_interaction(encoded, tmp_path):
    model, images, texts = encoded
    index = _create(tmp_path / "i", model, images, faiss_factory="IVF3,Flat", first_stage_tokens=2)
    index.add(images, _ids(0, NUM_IMAGES)).save()
    settings = _centroid_everything(index, 3)
    scores, rows = index.first_stage(texts, config=model.config, refine=NUM_IMAGES, **settings)
    expected = _dense_first_stage(model, images, texts, 2)
    torch.testing.assert_close(scores.double(), expected.gather(1, rows), atol=1e-5, rtol=1e-5)
    assert torch.equal(rows, expected.topk(NUM_IMAGES, dim=1).indices)


def test_centroid_interaction_equals_the_naive_loop():
    rng = np.random.default_rng(1)
    token_scores = rng.uniform(-0.2, 1.0, (3, 6))
    weight = rng.uniform(0.1, 1.0, 3)
    per_image = [[0, 4], [5], [1, 1, 2, 3]]
    got = centroid_interaction(token_scores, weight, np.concatenate(per_image), np.array([2, 1, 4]))
    expected = [sum(w * max(token_scores[i, c] for c in cs) for i, w in enumerate(weight)) / weight.sum()
                for cs in per_image]  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="at least one token centroid"):
        centroid_interaction(token_scores, weight, np.array([0]), np.array([1, 0]))


def _merged_shards(tmp_path, model, images, settings) -> TokenIndex:
    """The gallery built as two shards from the start trained at `tmp_path / "trained.faiss"`, merged."""
    shards = []
    for shard, rows in enumerate((range(0, 7), range(7, NUM_IMAGES))):
        part = _create(tmp_path / f"s{shard}", model, images, trained=tmp_path / "trained.faiss", **settings)
        part.add(_rows(images, slice(rows.start, rows.stop)), _ids(rows.start, rows.stop)).save()
        shards.append(part.path)
    return merge_token_indices(shards, tmp_path / "merged")


def test_centroid_files_of_appended_and_merged_builds_equal_one_build(encoded, tmp_path):
    model, images, texts = encoded
    settings = dict(faiss_factory="IVF3,Flat", first_stage_tokens=3)
    one = _create(tmp_path / "one", model, images, **settings)
    one.train_first_stage(images)
    one.write_trained(tmp_path / "trained.faiss")
    one.add(images, _ids(0, NUM_IMAGES)).save()
    appended = _create(tmp_path / "app", model, images, trained=tmp_path / "trained.faiss", **settings)
    appended.add(_rows(images, slice(0, 4)), _ids(0, 4)).save()
    appended = TokenIndex.open(tmp_path / "app")
    appended.add(_rows(images, slice(4, None)), _ids(4, NUM_IMAGES)).save()
    merged = _merged_shards(tmp_path, model, images, settings)
    search = dict(mode="centroids", nprobe=1, ndocs=5, candidates=4)
    reference = one.search(model, texts, k=3, **search)
    for other in (TokenIndex.open(appended.path), TokenIndex.open(merged.path)):
        for name in _CENTROID_NAMES:
            assert (one.path / f"{name}.bin").read_bytes() == (other.path / f"{name}.bin").read_bytes(), name
        result = other.search(model, texts, k=3, **search)
        assert torch.equal(result.indices, reference.indices)
    assert one.nbytes()["centroids"] > 0


def test_centroid_ids_of_an_older_index_are_read_from_faiss(encoded, tmp_path):
    model, images, texts = encoded
    fresh = _create(tmp_path / "fresh", model, images, faiss_factory="IVF3,Flat", first_stage_tokens=3)
    fresh.add(images, _ids(0, NUM_IMAGES)).save()
    shutil.copytree(fresh.path, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    for name in ("token_codes", "centroid_dtype", "centroid_lists_items", "first_stage_codes"):
        del meta[name]
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    for name in _CENTROID_NAMES:
        (tmp_path / "old" / f"{name}.bin").unlink()
    old = TokenIndex.open(tmp_path / "old")
    assert old.default_mode == "tokens"
    with pytest.raises(ValueError, match="build_centroid_ids"):
        old.first_stage(texts, mode="centroids")
    with pytest.raises(ValueError, match="run build_centroid_ids\\(\\) first"):
        old.build_first_stage_codes()
    old.build_centroid_ids()
    with pytest.raises(ValueError, match="build_first_stage_codes"):
        old.first_stage(texts, mode="centroids", refine=20)
    old.build_first_stage_codes(chunk=5)
    old = TokenIndex.open(tmp_path / "old")
    # the store keeps fp16 keep weights: they choose the first-stage tokens of the backfilled codes
    items, positions = select_tokens(images.token_mask, images.keep_weights.half().float(), 3)
    codes = np.fromfile(old.path / "first_stage_codes.bin", dtype=np.float32).reshape(
        -1, images.tokens.shape[-1]
    )
    np.testing.assert_array_equal(codes, images.tokens[items, positions].numpy())
    for name in ("centroid_counts", "centroid_lists", "centroid_offsets"):
        assert (fresh.path / f"{name}.bin").read_bytes() == (old.path / f"{name}.bin").read_bytes(), name
    search = dict(mode="centroids", nprobe=1, ndocs=6, candidates=4, refine=0, config=model.config)
    a, b = fresh.first_stage(texts, **search), old.first_stage(texts, **search)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])


def test_centroid_mode_refuses_bad_settings(encoded, tmp_path):
    model, images, texts = encoded
    flat = _create(tmp_path / "flat", model, images)
    flat.add(images, _ids(0, NUM_IMAGES)).save()
    assert flat.default_mode == "tokens"
    with pytest.raises(ValueError, match="stores no centroid ids"):
        flat.first_stage(texts, mode="centroids")
    with pytest.raises(ValueError, match="unknown first-stage mode 'plaid'"):
        flat.first_stage(texts, mode="plaid")
    with pytest.raises(ValueError, match="needs an IVF faiss_factory"):
        _create(tmp_path / "bad", model, images, token_codes=False)
    ivf = _create(tmp_path / "ivf", model, images, faiss_factory="IVF2,Flat", token_codes=False)
    ivf.add(images, _ids(0, NUM_IMAGES)).save()
    assert ivf.faiss_index.ntotal == 0 and ivf.faiss_index.is_trained
    with pytest.raises(ValueError, match="centroids only"):
        ivf.first_stage(texts, mode="tokens")
    with pytest.raises(ValueError, match="refine \\(3\\) must be 0 or >= candidates \\(5\\)"):
        ivf.first_stage(texts, mode="centroids", candidates=5, refine=3)
    with pytest.raises(ValueError, match="nprobe=0"):
        ivf.first_stage(texts, mode="centroids", nprobe=0)
    bare = _create(tmp_path / "bare", model, images, faiss_factory="IVF2,Flat", first_stage_codes=False)
    bare.add(images, _ids(0, NUM_IMAGES)).save()
    assert not (bare.path / "first_stage_codes.bin").exists()
    with pytest.raises(ValueError, match="refine needs the first-stage token codes"):
        bare.first_stage(texts, mode="centroids", refine=20)
    result = ivf.search(
        model, texts, k=3, mode="centroids", nprobe=2, ndocs=NUM_IMAGES, candidates=NUM_IMAGES
    )
    assert torch.equal(result.indices, exhaustive_topk(model, images, texts, k=3)[1])


def test_shard_ranges_cover_the_rows_once():
    assert [list(shard_range(7, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def _synthetic_images(rows: range, dim: int = 8) -> GranAlignImageOutput:
    generator = torch.Generator().manual_seed(rows.start)
    count = len(rows)
    keep = torch.rand(count, 5, generator=generator)
    return GranAlignImageOutput(
        tokens=torch.randn(count, 5, dim, generator=generator),
        token_mask=torch.ones(count, 5, dtype=torch.long),
        keep_weights=keep,
        region_tokens=torch.randn(count, 2, dim, generator=generator),
        image_embeds=F.normalize(torch.randn(count, dim, generator=generator), dim=-1),
    )


def _chunks(rank, world, total=10, chunk=2):
    share = shard_range(total, rank, world)
    for start in range(share.start, share.stop, chunk):
        rows = range(start, min(start + chunk, share.stop))
        yield [f"img{i}" for i in rows], _synthetic_images(rows)


#: the two-process builds: the IVF lists as centroids, and a 16-cell inverted multi-index
_SHARDED = {"ivf": dict(centroids="ivf"), "imi": dict(centroids="IMI2x2")}


def _sharded_settings(name):
    return dict(fingerprint="synthetic", dim=8, num_regions=2, codec="float16", first_stage_tokens=3,
                faiss_factory="IVF2,Flat", train_size=6, **_SHARDED[name])  # fmt: skip


def _distributed_build(path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    for name in _SHARDED:
        build_token_index_distributed(accelerator, _chunks, Path(path) / name, **_sharded_settings(name))


@pytest.mark.slow
def test_two_process_build_equals_one_process(tmp_path):
    """Two CPU processes (`accelerate launch`, gloo) each stream their share; the merged index equals a
    single-process build of the same chunks (after the same training), with the IVF lists and with an
    inverted multi-index as centroids. Fresh processes, not accelerate's forking `debug_launcher`: a fork
    of the multi-threaded pytest process can deadlock."""
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("the accelerate launcher is not installed next to this python")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from granalign.outputs_granalign import concat_image_outputs

    for name in _SHARDED:
        two = TokenIndex.open(tmp_path / "two" / name)
        quantizer = ["centroid_quantizer.faiss"] if name == "imi" else []
        assert two.ids == [f"img{i}" for i in range(10)]
        assert sorted(p.name for p in two.path.iterdir()) == sorted(
            ["meta.json", "ids.txt", "tokens.bin", "keep.bin", "lengths.bin", "regions.bin", "embeds.bin",
             "first_stage.faiss", *(f"{stem}.bin" for stem in _CENTROID_NAMES), *quantizer]
        )  # fmt: skip
        # the reference: one process, the same training sample (the main process's first chunk: 6 vectors)
        single = TokenIndex.create(tmp_path / "one" / name, **_sharded_settings(name))
        single.train_first_stage(concat_image_outputs([images for _, images in list(_chunks(0, 2))[:1]]))
        for rank in range(2):
            for ids, images in _chunks(rank, 2):
                single.add(images, ids)
        single.save()
        assert single.quantizer_spec == two.quantizer_spec == ("IMI2x2" if name == "imi" else "ivf")
        for file in ("tokens", "keep", "lengths", "regions", "embeds", *_CENTROID_NAMES):
            assert (single.path / f"{file}.bin").read_bytes() == (two.path / f"{file}.bin").read_bytes(), file
        for file in quantizer:
            assert (single.path / file).read_bytes() == (two.path / file).read_bytes()
        vectors = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(9)), dim=-1).numpy()
        for index in (single, two):
            faiss.ParameterSpace().set_index_parameters(index.faiss_index, "nprobe=1")
        assert np.array_equal(single.faiss_index.search(vectors, 5)[1], two.faiss_index.search(vectors, 5)[1])


# ------------------------------------------------------------------ the inverted multi-index quantizer


def _imi_cells(index, vectors):
    """Reference: FAISS's own multi-index assignment, and each cell's centroid `[nlist, d]` (the two
    half-centroids side by side, FAISS's id = a + ksub * b)."""
    quantizer = index.centroid_quantizer
    ksub, dsub = int(quantizer.pq.ksub), int(quantizer.pq.dsub)
    books = faiss.vector_to_array(quantizer.pq.centroids).reshape(2, ksub, dsub)
    cells = np.array([np.concatenate([books[0][c % ksub], books[1][c // ksub]]) for c in range(ksub * ksub)])
    return quantizer.search(np.ascontiguousarray(vectors), 1)[1][:, 0], cells


def _imi_index(path, model, images, limit=3, bits=2, **kwargs):
    index = _create(path, model, images, faiss_factory="Flat", first_stage_tokens=limit, centroids=f"IMI2x{bits}",
                    **kwargs)  # fmt: skip
    return index.add(images, _ids(0, NUM_IMAGES)).save()


def test_multi_index_assignment_and_cell_cosines_equal_faiss_and_brute_force(encoded, tmp_path):
    model, images, texts = encoded
    index = _imi_index(tmp_path / "i", model, images)
    assert index.quantizer_spec == "IMI2x2" and index.default_mode == "centroids"
    items, positions = select_tokens(images.token_mask, images.keep_weights, 3)
    vectors = F.normalize(images.tokens[items, positions].float(), dim=-1).numpy()
    assigned, cells = _imi_cells(index, vectors)
    stored = np.fromfile(index.path / "centroids.bin", dtype=np.uint16)
    np.testing.assert_array_equal(stored, assigned)  # `add` stores FAISS's nearest cell of each token
    np.testing.assert_array_equal(index._assign(vectors), assigned)
    queries, _, _ = first_stage_query_tokens(texts, model.config)
    expected = queries @ (cells / np.linalg.norm(cells, axis=1, keepdims=True)).T
    multi = index._multi()
    every_cell = np.arange(multi.nlist)
    np.testing.assert_allclose(
        multi.cell_cosines(multi.half_scores(queries), every_cell), expected, atol=1e-5
    )


def test_multi_index_centroid_interaction_equals_the_dense_reference(encoded, tmp_path):
    model, images, texts = encoded
    index = _imi_index(tmp_path / "i", model, images)
    scores, rows = index.first_stage(texts, config=model.config, refine=0, **_centroid_everything(index, 16))
    items, positions = select_tokens(images.token_mask, images.keep_weights, 3)
    assigned, cells = _imi_cells(index, F.normalize(images.tokens[items, positions].float(), dim=-1).numpy())
    centroids = F.normalize(torch.from_numpy(cells).double(), dim=-1)
    per_image = [sorted(set(assigned[items.numpy() == n].tolist())) for n in range(NUM_IMAGES)]
    _assert_centroid_interaction(scores, rows, texts, model.config, centroids, per_image)


def test_multi_index_candidates_are_the_images_of_the_probed_cells(encoded, tmp_path):
    model, images, texts = encoded
    index = _imi_index(tmp_path / "i", model, images, limit=2)
    _, rows = index.first_stage(
        texts, config=model.config, mode="centroids", nprobe=1, ndocs=NUM_IMAGES, candidates=NUM_IMAGES
    )
    items, positions = select_tokens(images.token_mask, images.keep_weights, 2)
    assigned, _ = _imi_cells(index, F.normalize(images.tokens[items, positions].float(), dim=-1).numpy())
    per_image = [set(assigned[items.numpy() == n].tolist()) for n in range(NUM_IMAGES)]
    vectors, token_query, _ = first_stage_query_tokens(texts, model.config)
    probed = index.centroid_quantizer.search(vectors, 1)[1][:, 0]  # FAISS's nearest cell (L2)
    for q in range(texts.tokens.shape[0]):
        lists = set(probed[token_query == q].tolist())
        expected = {n for n, cs in enumerate(per_image) if lists & cs}
        assert set(rows[q][rows[q] >= 0].tolist()) == expected


def test_multi_index_probes_are_faiss_nearest_cells(encoded, tmp_path):
    model, images, texts = encoded
    index = _imi_index(tmp_path / "i", model, images, bits=3)
    vectors, _, _ = first_stage_query_tokens(texts, model.config)
    multi = index._multi()
    halves = multi.half_scores(vectors)
    for nprobe in (1, 3, 10, 64):
        expected = index.centroid_quantizer.search(vectors, nprobe)[1]
        got = multi.probe(halves, nprobe)
        assert [set(row) for row in got.tolist()] == [set(row) for row in expected.tolist()], nprobe
    cells = np.array([0, 5, 63, 9])
    _, centroids = _imi_cells(index, vectors)
    expected = vectors @ (centroids[cells] / np.linalg.norm(centroids[cells], axis=1, keepdims=True)).T
    np.testing.assert_allclose(multi.cell_cosines(halves, cells), expected, atol=1e-5)
    every_cell = multi.cell_cosines(halves, np.arange(multi.nlist))  # [T, nlist]
    own = multi.own_cosines(halves, got)  # each token's cosine with its own probed cells
    np.testing.assert_allclose(own, np.take_along_axis(every_cell, got, 1), atol=1e-6)


def test_multi_index_with_exhaustive_settings_gives_the_exhaustive_ranking(encoded, tmp_path):
    model, images, texts = encoded
    _imi_index(tmp_path / "i", model, images, limit=None, token_codes=False)
    index = TokenIndex.open(tmp_path / "i", model=model)  # the quantizer is read back from disk
    assert index.faiss_index.ntotal == 0 and index.quantizer_spec == "IMI2x2"
    result = index.search(model, texts, k=6, refine=NUM_IMAGES, **_centroid_everything(index, 16))
    scores, rows = exhaustive_topk(model, images, texts, k=6)
    assert torch.equal(result.indices, rows)
    torch.testing.assert_close(result.scores, scores, atol=1e-4, rtol=1e-4)


def test_multi_index_shards_merge_and_reassignment(encoded, tmp_path):
    model, images, texts = encoded
    settings = dict(faiss_factory="IVF3,Flat", first_stage_tokens=3, centroids="IMI2x2")
    one = _create(tmp_path / "one", model, images, **settings)
    one.train_first_stage(images)
    one.write_trained(tmp_path / "trained.faiss")
    assert (tmp_path / "trained.faiss.centroids.faiss").is_file()
    one.add(images, _ids(0, NUM_IMAGES)).save()
    merged = _merged_shards(tmp_path, model, images, settings)
    for name in _CENTROID_NAMES:
        assert (one.path / f"{name}.bin").read_bytes() == (merged.path / f"{name}.bin").read_bytes(), name
    other = _create(tmp_path / "other", model, images, **settings)  # trained on its own sample: differs
    other.add(_rows(images, slice(0, 5)), _ids(20, 25)).save()
    with pytest.raises(ValueError, match="centroid quantizers differ"):
        merge_token_indices([tmp_path / "s0", other.path], tmp_path / "bad")
    # an IVF-quantizer index re-assigned to a multi-index (from its float32 first-stage codes), and back
    ivf = _create(tmp_path / "ivf", model, images, faiss_factory="IVF3,Flat", first_stage_tokens=3)
    ivf.add(images, _ids(0, NUM_IMAGES)).save()
    lists = (ivf.path / "centroid_lists.bin").read_bytes()
    ivf.assign_centroids("IMI2x2")
    again = TokenIndex.open(ivf.path)
    assert again.quantizer_spec == "IMI2x2"
    codes = np.fromfile(ivf.path / "first_stage_codes.bin", dtype=np.float32).reshape(
        -1, images.tokens.shape[-1]
    )
    assigned, _ = _imi_cells(again, codes / np.linalg.norm(codes, axis=1, keepdims=True))
    np.testing.assert_array_equal(np.fromfile(ivf.path / "centroids.bin", dtype=np.uint16), assigned)
    again.first_stage(texts, config=model.config, mode="centroids", nprobe=2, ndocs=6, candidates=4)
    again.assign_centroids("ivf")
    back = TokenIndex.open(ivf.path)
    assert back.quantizer_spec == "ivf" and not (ivf.path / "centroid_quantizer.faiss").exists()
    assert (ivf.path / "centroid_lists.bin").read_bytes() == lists


def test_centroid_quantizer_options_are_resolved_or_refused(encoded, tmp_path):
    from granalign.retrieval.multivector import plaid_nlist, resolve_centroids

    model, images, _ = encoded
    assert plaid_nlist(32_000_000) == 65536 and plaid_nlist(3_200_000) == 16384
    assert resolve_centroids("auto", 1_000_000, 32, 1024) == "IMI2x8"
    assert resolve_centroids("auto", 524_288, 32, 1024) == "IMI2x8"  # where PLAID's count reaches 65,536
    assert resolve_centroids("auto", 524_287, 32, 1024) == "ivf"  # IMI2x7 lost recall against IVF1024
    assert resolve_centroids("auto", 100_000, 32, 1024) == "ivf"
    assert resolve_centroids("auto", 13, 32, 1) == "ivf"  # a tiny gallery's IVF1 rather than an IMI
    assert resolve_centroids("auto", 100_000, 32, None) == "IMI2x7"  # no IVF to fall back on: PLAID's size
    assert resolve_centroids("auto", 1_000, 32, 1024) == "ivf"  # PLAID's count is below the IVF's nlist
    assert resolve_centroids("auto", None, 32, 1024) == "ivf"  # no size given: as before the option
    assert resolve_centroids("auto", None, 32, None) is None
    assert resolve_centroids("auto", 10**9, None, None) == "IMI2x8"  # capped: uint16 cell ids
    for bad in ("IMI2x9", "IMI2x0", "IMI3x4", "imi2x8", "flat"):
        with pytest.raises(ValueError, match=f"unknown centroid quantizer '{bad}'"):
            _create(tmp_path / bad, model, images, centroids=bad)
    with pytest.raises(ValueError, match="expected_items must be >= 1 or None, got 0"):
        _create(tmp_path / "zero", model, images, expected_items=0)
    with pytest.raises(ValueError, match="centroids='ivf' needs an IVF faiss_factory"):
        _create(tmp_path / "flat-ivf", model, images, centroids="ivf")
    few = _create(tmp_path / "few", model, images, centroids="IMI2x4", first_stage_tokens=1, train_size=4)
    with pytest.raises(ValueError, match="'IMI2x4' needs at least 16 first-stage vectors"):
        few.add(_rows(images, slice(0, 5)), _ids(0, 5))
    with pytest.raises(ValueError, match="dim must be even, got 7"):
        TokenIndex.create(
            tmp_path / "odd", fingerprint="x", dim=7, num_regions=0, faiss_factory="Flat", centroids="IMI2x2"
        )
    bare = _create(tmp_path / "bare", model, images, faiss_factory="IVF2,Flat", first_stage_codes=False)
    bare.add(images, _ids(0, NUM_IMAGES)).save()
    with pytest.raises(ValueError, match="run build_first_stage_codes\\(\\) first"):
        bare.assign_centroids("IMI2x2")
    with pytest.raises(ValueError, match="centroids='ivf' needs an IVF faiss_factory"):
        _imi_index(tmp_path / "flat", model, images).assign_centroids("ivf")
    centroids_only = _create(tmp_path / "co", model, images, faiss_factory="IVF2,Flat", centroids="IMI2x2",
                             token_codes=False)  # fmt: skip
    centroids_only.add(images, _ids(0, NUM_IMAGES)).save()
    with pytest.raises(ValueError, match="reads the cells from the FAISS IVF lists"):
        centroids_only.assign_centroids("ivf")


if __name__ == "__main__":  # one process of test_two_process_build_equals_one_process
    _distributed_build(sys.argv[1])
