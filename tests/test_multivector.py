"""The multi-vector token index (`granalign.retrieval.multivector`): each optimised path against a plain
reference. Small tiny-model galleries; exact FAISS settings; no timing (speed lives in benchmarks/)."""

from __future__ import annotations

import os
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


def _distributed_build(path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    settings = dict(fingerprint="synthetic", dim=8, num_regions=2, codec="float16", first_stage_tokens=3,
                    faiss_factory="IVF2,Flat", train_size=6)  # fmt: skip
    build_token_index_distributed(accelerator, _chunks, path, **settings)


@pytest.mark.slow
def test_two_process_build_equals_one_process(tmp_path):
    """Two CPU processes (`accelerate launch`, gloo) each stream their share; the merged index equals a
    single-process build of the same chunks (after the same training). Fresh processes, not accelerate's
    forking `debug_launcher`: a fork of the multi-threaded pytest process can deadlock."""
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("the accelerate launcher is not installed next to this python")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = TokenIndex.open(tmp_path / "two")
    assert two.ids == [f"img{i}" for i in range(10)] and sorted(p.name for p in two.path.iterdir()) == sorted(
        [
            "meta.json",
            "ids.txt",
            "tokens.bin",
            "keep.bin",
            "lengths.bin",
            "regions.bin",
            "embeds.bin",
            "first_stage.faiss",
        ]
    )
    # the reference: one process, the same training sample (the main process's first chunk: 6 vectors)
    single = TokenIndex.create(tmp_path / "one", fingerprint="synthetic", dim=8, num_regions=2, codec="float16",
                               first_stage_tokens=3, faiss_factory="IVF2,Flat", train_size=6)  # fmt: skip
    first = list(_chunks(0, 2))[:1]
    from granalign.outputs_granalign import concat_image_outputs

    single.train_first_stage(concat_image_outputs([images for _, images in first]))
    for rank in range(2):
        for ids, images in _chunks(rank, 2):
            single.add(images, ids)
    single.save()
    for name in ("tokens", "keep", "lengths", "regions", "embeds"):
        assert (single.path / f"{name}.bin").read_bytes() == (two.path / f"{name}.bin").read_bytes()
    vectors = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(9)), dim=-1).numpy()
    for index in (single, two):
        faiss.ParameterSpace().set_index_parameters(index.faiss_index, "nprobe=1")
    assert np.array_equal(single.faiss_index.search(vectors, 5)[1], two.faiss_index.search(vectors, 5)[1])


if __name__ == "__main__":  # one process of test_two_process_build_equals_one_process
    _distributed_build(sys.argv[1])
