"""Retrieval: the gathered pair kernel equals the per-pair reference; exhaustive and two-stage search,
the evaluation matrix, the gallery index on disk (dtype, ids, model revision) and the CLI commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from reference_scoring import reference_levels
from tiny_configs import IMAGE_SIZE, WORDS, image_inputs, text_inputs, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.evaluation.two_stage import fold_two_stage_scores
from granalign.retrieval import (
    GalleryIndex,
    default_shortlist,
    encode_captions,
    encode_images,
    encode_regions,
    exact_topk,
    exhaustive_topk,
    list_image_files,
    model_fingerprint,
    pair_level_scores,
    pair_scores,
    region_level_scores,
    search,
    two_stage_scores,
    two_stage_topk,
)
from granalign.retrieval.cli_retrieval import add_index_parser, add_search_parser, run_index, run_search
from granalign.retrieval.shortlist import EmbeddingShortlist


@pytest.fixture(scope="module", params=["vit", None])
def encoded(request):
    model = tiny_model(request.param, seed=1).eval()
    with torch.no_grad():
        images = model.encode_image(**image_inputs(request.param, batch=6, seed=2))
        texts = model.encode_text(**text_inputs(batch=9, seed=3))
    return model, images, texts


@pytest.fixture(scope="module")
def reference(encoded):
    return reference_levels(encoded[1], encoded[2])


def _first_stage(model, images, texts, shortlist_by):
    """The first-stage scores `[N_img, N_txt]` a two-stage search shortlists by."""
    if shortlist_by == "regions":
        return region_level_scores(images, texts, model.config.similarity_negative_slope)
    return images.image_embeds @ texts.text_embeds.t()


def _random_pairs(num_images, num_texts, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(num_images, (count,), generator=generator),
        torch.randint(num_texts, (count,), generator=generator),
    )


# ------------------------------------------------------------------------------ gathered pair kernel


@pytest.mark.parametrize("pair_chunk_size", [1, 4, 1000])
def test_pair_levels_equal_the_per_pair_reference(encoded, reference, pair_chunk_size):
    _, images, texts = encoded
    image_index, text_index = _random_pairs(6, 9, 23)  # few pairs per item: the batched-pairs path
    fast = pair_level_scores(images, texts, image_index, text_index, pair_chunk_size=pair_chunk_size)
    expected = reference[:, image_index, text_index]
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pair_chunk_size", [3, 1000])
@pytest.mark.parametrize("shared_side", ["image", "text"])
def test_grouped_pairs_equal_the_per_pair_reference(encoded, reference, pair_chunk_size, shared_side):
    _, images, texts = encoded
    generator = torch.Generator().manual_seed(5)
    if shared_side == "image":  # two images, each with many captions: grouped by image
        image_index = torch.tensor([4] * 9 + [1] * 8)
        text_index = torch.cat(
            [torch.randperm(9, generator=generator), torch.randperm(9, generator=generator)[:8]]
        )
    else:  # one caption query with every image as candidate, twice: grouped by caption
        image_index = torch.cat(
            [torch.randperm(6, generator=generator), torch.randperm(6, generator=generator)]
        )
        text_index = torch.tensor([7] * 6 + [2] * 6)
    order = torch.randperm(len(image_index), generator=generator)  # any pair order
    image_index, text_index = image_index[order], text_index[order]
    fast = pair_level_scores(images, texts, image_index, text_index, pair_chunk_size=pair_chunk_size)
    torch.testing.assert_close(fast, reference[:, image_index, text_index], atol=1e-5, rtol=1e-5)


def test_region_level_scores_equal_the_uncertainty_level(encoded, reference):
    model, images, texts = encoded
    scores = region_level_scores(images, texts, model.config.similarity_negative_slope, 4, 5)
    torch.testing.assert_close(scores, reference[2], atol=1e-5, rtol=1e-5)


def test_pair_scores_equal_the_full_score_matrix(encoded):
    model, images, texts = encoded
    image_index, text_index = _random_pairs(6, 9, 17, seed=1)
    full = model.score(images, texts)
    torch.testing.assert_close(
        pair_scores(model, images, texts, image_index, text_index), full[image_index, text_index]
    )
    torch.testing.assert_close(  # the config alone is enough, and reduced precision stays close
        pair_scores(model.config, images, texts, image_index, text_index, dtype=torch.bfloat16),
        full[image_index, text_index],
        atol=2e-2,
        rtol=2e-2,
    )


def test_pair_scores_reject_bad_indices(encoded):
    model, images, texts = encoded
    with pytest.raises(ValueError, match="image_index holds 6, outside the 6 items"):
        pair_scores(model, images, texts, torch.tensor([6]), torch.tensor([0]))
    with pytest.raises(ValueError, match="must pair up, got 2 and 1"):
        pair_scores(model, images, texts, torch.tensor([0, 1]), torch.tensor([0]))


# ------------------------------------------------------------------------------ evaluation matrix


def test_two_stage_scores_with_a_full_shortlist_equal_exhaustive(encoded):
    model, images, texts = encoded
    torch.testing.assert_close(
        two_stage_scores(model, images, texts, shortlist=100), model.score(images, texts)
    )


@pytest.mark.parametrize("shortlist_by", ["regions", "embeddings"])
@pytest.mark.parametrize("direction", ["i2t", "t2i", "union"])
def test_two_stage_scores_score_exactly_the_shortlisted_pairs(encoded, direction, shortlist_by):
    model, images, texts = encoded
    scores = two_stage_scores(
        model, images, texts, shortlist=2, direction=direction, shortlist_by=shortlist_by
    )
    similarity = _first_stage(model, images, texts, shortlist_by)
    expected = torch.zeros(6, 9, dtype=torch.bool)
    if direction in ("i2t", "union"):
        expected.scatter_(1, similarity.topk(2, dim=1).indices, True)
    if direction in ("t2i", "union"):
        expected.scatter_(0, similarity.topk(2, dim=0).indices, True)
    assert torch.equal(torch.isfinite(scores), expected)
    torch.testing.assert_close(scores[expected], model.score(images, texts)[expected])


# ------------------------------------------------------------------------------ search


def test_exact_topk_streams_the_gallery():
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(5, 8, generator=generator), torch.randn(37, 8, generator=generator)
    scores, index = exact_topk(queries, gallery, 6, gallery_chunk_size=4)
    expected = (queries @ gallery.t()).topk(6, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(index, expected.indices)


def test_faiss_shortlist_equals_the_exact_one():
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    shortlist = EmbeddingShortlist(gallery)
    faiss_scores, faiss_index = shortlist.topk(queries, 7, backend="faiss")
    exact_scores, exact_index = shortlist.topk(queries, 7, backend="matmul")
    assert torch.equal(faiss_index, exact_index)
    torch.testing.assert_close(faiss_scores, exact_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_exhaustive_topk_equals_the_top_of_the_score_matrix(encoded, direction):
    model, images, texts = encoded
    full = model.score(images, texts)
    if direction == "t2i":
        scores, rows = exhaustive_topk(model, images, texts, k=4, gallery_chunk_size=4)
        expected = full.t().topk(4, dim=1)
    else:
        scores, rows = exhaustive_topk(model, texts, images, k=4, gallery_chunk_size=4)
        expected = full.topk(4, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(rows, expected.indices)


@pytest.mark.parametrize("shortlist_by", ["regions", "embeddings"])
def test_two_stage_topk_reranks_the_shortlist(encoded, shortlist_by):
    model, images, texts = encoded
    full = model.score(images, texts).t()  # [texts, images]
    scores, rows = two_stage_topk(model, images, texts, k=2, shortlist=3, shortlist_by=shortlist_by)
    shortlist = _first_stage(model, images, texts, shortlist_by).t().topk(3, dim=1).indices
    expected = full.gather(1, shortlist).topk(2, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(rows, shortlist.gather(1, expected.indices))
    # with the whole gallery shortlisted, two-stage is exhaustive
    torch.testing.assert_close(
        two_stage_topk(model, images, texts, k=3, shortlist=6)[0], full.topk(3, dim=1).values
    )


def test_default_shortlist_depends_on_the_query_modality(encoded, monkeypatch):
    import importlib

    search_module = importlib.import_module("granalign.retrieval.search")
    model, images, texts = encoded
    assert default_shortlist(texts) == 20 and default_shortlist(images) == 50
    monkeypatch.setattr(search_module, "DEFAULT_SHORTLIST", 2)
    monkeypatch.setattr(search_module, "DEFAULT_IMAGE_QUERY_SHORTLIST", 3)
    for gallery, queries, size in ((images, texts, 2), (texts, images, 3)):
        default = two_stage_topk(model, gallery, queries, k=1)
        explicit = two_stage_topk(model, gallery, queries, k=1, shortlist=size)
        assert all(torch.equal(a, b) for a, b in zip(default, explicit, strict=True))
        other = two_stage_topk(model, gallery, queries, k=1, shortlist=1)
        assert not torch.equal(default[0], other[0])  # so the default, not a shortlist of 1, was used


def test_search_rejects_queries_of_the_gallery_modality(encoded):
    model, images, texts = encoded
    index = GalleryIndex.build(model, images, ids=[f"i{n}" for n in range(6)])
    with pytest.raises(
        ValueError, match="GranAlignImageOutput queries against a GranAlignImageOutput gallery"
    ):
        search(model, index, images)
    with pytest.raises(ValueError, match="unknown search mode 'fast'"):
        search(model, index, texts, mode="fast")


# ------------------------------------------------------------------------------ the index on disk


def test_index_round_trips_exactly_and_searches_like_the_outputs(encoded, tmp_path):
    model, images, texts = encoded
    ids = [f"img-{n}" for n in range(6)]
    index = GalleryIndex.build(model, images, ids)
    loaded = GalleryIndex.load(index.save(tmp_path / "g.safetensors"), model=model)
    assert loaded.ids == ids and loaded.modality == "image" and loaded.dtype_name == "float32"
    assert GalleryIndex.read_ids(tmp_path / "g.safetensors") == ids  # from the checked header alone
    (tmp_path / "foreign.safetensors").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="is not a readable gallery index"):
        GalleryIndex.read_ids(tmp_path / "foreign.safetensors")
    for name in ("tokens", "keep_weights", "region_tokens", "image_embeds"):
        assert torch.equal(getattr(loaded.outputs, name), getattr(images, name))
    exhaustive = search(model, loaded, texts, k=3, mode="exhaustive")
    full = search(model, loaded, texts, k=3, shortlist=6)
    assert (
        exhaustive.ids
        == full.ids
        == [[ids[r] for r in row] for row in model.score(images, texts).t().topk(3).indices]
    )
    meta = loaded.metadata()
    assert meta["feature_version"] == "1" and meta["model_fingerprint"] == model_fingerprint(model)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_index_scores_stay_close(encoded, tmp_path, dtype):
    model, images, texts = encoded
    index = GalleryIndex.build(model, texts, [str(n) for n in range(9)], texts=list("abcdefghi"), dtype=dtype)
    loaded = GalleryIndex.load(index.save(tmp_path / "t.safetensors"))
    assert loaded.outputs.tokens.dtype == getattr(torch, dtype) and loaded.texts == list("abcdefghi")
    torch.testing.assert_close(
        model.score(images, loaded.outputs), model.score(images, texts), atol=2e-2, rtol=2e-2
    )


def test_adding_items_appends_and_keeps_ids_unique(encoded, tmp_path):
    model, images, texts = encoded
    head = type(texts)(**{k: v[:4] for k, v in texts.items()})
    rest = type(texts)(**{k: v[4:] for k, v in texts.items()})
    index = GalleryIndex.build(model, head, ["a", "b", "c", "d"], texts=["ta", "tb", "tc", "td"])
    with pytest.raises(ValueError, match=r"already in the index: \['b'\]"):
        index.add(rest, ["e", "b", "f", "g", "h"], texts=list("ebfgh"))
    with pytest.raises(ValueError, match=r"repeated: \['e'\]"):
        index.add(rest, ["e", "e", "f", "g", "h"], texts=list("eefgh"))
    index.add(rest, ["e", "f", "g", "h", "i"], texts=list("efghi"), model=model)
    loaded = GalleryIndex.load(index.save(tmp_path / "t.safetensors"))
    assert loaded.ids == list("abcdefghi") and loaded.texts[-1] == "i"
    torch.testing.assert_close(model.score(images, loaded.outputs), model.score(images, texts))
    with pytest.raises(ValueError, match="cannot add image items to an index of texts"):
        loaded.add(images, [str(n) for n in range(6)])


def test_an_index_from_another_model_revision_is_refused(encoded, tmp_path):
    model, images, _ = encoded
    path = GalleryIndex.build(model, images, [str(n) for n in range(6)]).save(tmp_path / "g.safetensors")
    other = tiny_model(None if model.vision_model is None else "vit", seed=7)
    with pytest.raises(ValueError) as error:
        GalleryIndex.load(path, model=other)
    message = str(error.value)
    assert (
        model_fingerprint(model) in message and model_fingerprint(other) in message and "rebuild" in message
    )
    index, queries = GalleryIndex.load(path), other.encode_text(**text_inputs(batch=2, seed=3))
    with pytest.raises(ValueError, match="rebuild"):
        search(other, index, queries, k=2, mode="exhaustive")
    assert search(other, index, queries, k=2, mode="exhaustive", check_model=False).ids  # caller checked


def test_fingerprint_tracks_weights_and_config_not_dtype():
    model = tiny_model(None, seed=1)
    fingerprint = model_fingerprint(model)
    assert fingerprint.startswith("sha256:") and model_fingerprint(model.to(torch.float64)) == fingerprint
    changed = tiny_model(None, seed=1, level_weights=[0.5, 0.3, 0.2])
    assert model_fingerprint(changed) != fingerprint
    with torch.no_grad():
        model.text_projection.bias[0] += 1e-3
    assert model_fingerprint(model) != fingerprint


def test_files_that_are_not_current_indices_are_refused(encoded, tmp_path):
    model, images, _ = encoded
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a granalign gallery index"):
        GalleryIndex.load(tmp_path / "other.safetensors")
    index = GalleryIndex.build(model, images, [str(n) for n in range(6)])
    old = tmp_path / "old.safetensors"
    save_file(
        {k: getattr(index.outputs, k) for k in ("tokens",)},
        old,
        metadata={**index.metadata(), "feature_version": "0"},
    )
    with pytest.raises(ValueError, match="feature version 0, but this granalign reads version 1"):
        GalleryIndex.load(old)
    with pytest.raises(FileNotFoundError, match="no gallery index"):
        GalleryIndex.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------ encoding and the CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model("vit", seed=4).eval()
    processor = GranAlignProcessor(
        ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tiny_tokenizer(directory),
        max_length=12,
    )
    model.save_pretrained(directory / "m")
    processor.save_pretrained(directory / "m")
    images = directory / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(5):
        target = images / ("sub" if n % 2 else "") / f"img{n}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(target)
    (images / "notes.txt").write_text("not an image")
    return directory, model, processor


def test_encoding_in_batches_equals_one_batch(saved_model):
    directory, model, processor = saved_model
    files = list_image_files([directory / "images"])
    assert [f.name for f in files] == ["img0.png", "img2.png", "img4.png", "img1.png", "img3.png"]
    batched = encode_images(model, processor, files, batch_size=2, progress=False)
    with torch.no_grad():
        whole = model.encode_image(**processor(images=[Image.open(f) for f in files], return_tensors="pt"))
    torch.testing.assert_close(batched.tokens, whole.tokens)
    captions = [" ".join(WORDS[i : i + 2 + i % 3]) for i in range(7)]
    texts = encode_captions(model, processor, captions, batch_size=3, progress=False)
    single = encode_captions(model, processor, captions, batch_size=7, progress=False)
    torch.testing.assert_close(
        model.score(batched, texts), model.score(batched, single), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(FileNotFoundError, match="no image file or folder"):
        list_image_files([directory / "nowhere"])


def test_encode_regions_pads_variable_region_counts():
    model = tiny_model(None, seed=1).eval()
    inputs = image_inputs(None, batch=4, seed=2)
    arrays = [
        f[m.bool()].numpy() for f, m in zip(inputs["region_features"], inputs["region_mask"], strict=True)
    ]
    encoded = encode_regions(model, arrays, batch_size=3, progress=False)
    with torch.no_grad():
        expected = model.encode_image(**inputs)
    torch.testing.assert_close(encoded.region_tokens, expected.region_tokens, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"regions\[1\] must be a non-empty \[N, D\] array"):
        encode_regions(model, [arrays[0], np.zeros((0, arrays[0].shape[1]))], progress=False)


def test_cli_choices_match_the_library():
    import importlib

    from granalign import cli_parsers

    # the package exports a `search` function, which shadows the submodule of the same name
    search = importlib.import_module("granalign.retrieval.search")
    shortlist = importlib.import_module("granalign.retrieval.shortlist")

    assert cli_parsers.MODES == search.MODES and cli_parsers.DEFAULT_SHORTLIST == search.DEFAULT_SHORTLIST
    assert cli_parsers.DEFAULT_IMAGE_QUERY_SHORTLIST == search.DEFAULT_IMAGE_QUERY_SHORTLIST
    assert cli_parsers.SHORTLIST_SOURCES == shortlist.SHORTLIST_SOURCES
    assert cli_parsers.BACKENDS == shortlist.BACKENDS
    multivector = importlib.import_module("granalign.retrieval.multivector")
    assert cli_parsers.TOKEN_CODECS == multivector.CODECS
    assert sorted(cli_parsers.TOKEN_FIRST_STAGES) == sorted(multivector.FIRST_STAGE_MODES)
    assert cli_parsers.TOKEN_CENTROIDS == multivector.CENTROID_QUANTIZERS


def _cli(argv):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    add_index_parser(commands)
    add_search_parser(commands)
    args = parser.parse_args(argv)
    return {"index": run_index, "search": run_search}[args.command](args)


def test_cli_indexes_and_searches_both_ways(saved_model, tmp_path, capsys):
    directory = saved_model[0]
    model_dir, gallery = str(directory / "m"), str(tmp_path / "images.safetensors")
    assert (
        _cli(
            [
                "index",
                model_dir,
                gallery,
                "--images",
                str(directory / "images"),
                "--no-progress",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    out = tmp_path / "hits.json"
    argv = ["search", gallery, model_dir, "--text", "red circle", "blue square", "-k", "3", "--no-progress"]
    assert _cli([*argv, "--output-json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and [hit["rank"] for hit in results[0]] == [1, 2, 3]
    assert _cli([*argv, "--mode", "exhaustive"]) == 0
    assert _cli([*argv, "--shortlist-by", "embeddings", "--backend", "matmul"]) == 0
    printed = capsys.readouterr().out
    assert "query: red circle" in printed and "query: blue square" in printed and "img" in printed

    captions = tmp_path / "captions.txt"
    captions.write_text("c1\tred circle\nc2\tblue square left of a star\n\nc3\tgreen cross\n")
    texts = str(tmp_path / "texts.safetensors")
    assert _cli(["index", model_dir, texts, "--captions-file", str(captions), "--no-progress"]) == 0
    image = str(directory / "images" / "img0.png")
    assert (
        _cli(
            [
                "search",
                texts,
                model_dir,
                "--image",
                image,
                "-k",
                "2",
                "--no-progress",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    hits = json.loads(out.read_text())["results"][0]
    assert {hit["id"] for hit in hits} <= {"c1", "c2", "c3"} and all("text" in hit for hit in hits)


def test_cli_append_and_revision_errors(saved_model, tmp_path):
    directory, _, _ = saved_model
    model_dir, texts = str(directory / "m"), str(tmp_path / "texts.safetensors")
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("a\tred circle\nb\tblue star\n")
    second.write_text("c\tgreen cross\nb\tsmall square\n")
    assert _cli(["index", model_dir, texts, "--captions-file", str(first), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="exists: pass --append"):
        _cli(["index", model_dir, texts, "--captions-file", str(second), "--no-progress"])
    with pytest.raises(ValueError, match=r"already in the index: \['b'\]"):
        _cli(["index", model_dir, texts, "--captions-file", str(second), "--append", "--no-progress"])
    second.write_text("c\tgreen cross\n")
    assert _cli(["index", model_dir, texts, "--captions-file", str(second), "--append", "--no-progress"]) == 0
    assert GalleryIndex.load(texts).ids == ["a", "b", "c"]

    other = tiny_model("vit", seed=9)
    other.save_pretrained(tmp_path / "other")
    GranAlignProcessor.from_pretrained(model_dir).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="this index was built by model sha256:"):
        _cli(
            ["search", texts, str(tmp_path / "other"), "--image", str(directory / "images"), "--no-progress"]
        )


def test_cli_token_index_builds_appends_and_searches_like_exhaustive(saved_model, tmp_path):
    pytest.importorskip("faiss")
    from granalign.retrieval.multivector import TokenIndex

    directory, model, processor = saved_model
    model_dir, output = str(directory / "m"), tmp_path / "tokens"
    # the IVF lists (one here): `--centroids auto` would pick a multi-index for the gallery size
    build = ["index", model_dir, str(output), "--token-index", "--codec", "float32", "--centroids", "ivf",
             "--no-progress"]  # fmt: skip
    first, rest = directory / "images" / "img0.png", directory / "images" / "sub"
    assert (
        _cli(
            [
                *build,
                "--first-stage-tokens",
                "0",
                "--images",
                str(first),
                str(directory / "images" / "img2.png"),
            ]
        )
        == 0
    )
    with pytest.raises(ValueError, match="holds a token index: pass --append"):
        _cli([*build, "--images", str(rest)])
    assert _cli([*build, "--append", "--images", str(rest), str(directory / "images" / "img4.png")]) == 0
    index = TokenIndex.open(output, model=model)
    assert len(index) == 5 and index.has_centroids and index.meta["faiss_factory"] == "IVF1,Flat"

    files = list_image_files([directory / "images"])
    images = encode_images(model, processor, files, progress=False)
    captions = ["red circle", "blue square left of a star"]
    texts = encode_captions(model, processor, captions, progress=False)
    _, rows = exhaustive_topk(model, images, texts, k=3)
    expected = [[str(files[int(r)]) for r in row] for row in rows]
    out = tmp_path / "hits.json"
    search = ["search", str(output), model_dir, "--text", *captions, "-k", "3", "--no-progress", "--shortlist", "5",
              "--query-tokens", "0", "--output-json", str(out)]  # fmt: skip
    for first_stage in (["--nprobe", "1", "--ndocs", "5"], ["--first-stage", "tokens", "--token-k", "1000"]):
        assert _cli([*search, *first_stage]) == 0
        results = json.loads(out.read_text())["results"]
        assert [[hit["id"] for hit in hits] for hits in results] == expected, first_stage

    with pytest.raises(ValueError, match="search it with --text"):
        _cli(["search", str(output), model_dir, "--image", str(first), "--no-progress"])
    with pytest.raises(ValueError, match="--mode exhaustive is not available"):
        _cli([*search, "--mode", "exhaustive"])
    with pytest.raises(ValueError, match="indexes images"):
        _cli(["index", model_dir, str(tmp_path / "t"), "--token-index", "--captions-file", str(out)])
    other = tiny_model("vit", seed=9)
    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="this token index was built by model"):
        _cli(["search", str(output), str(tmp_path / "other"), "--text", "red", "--no-progress"])


def test_cli_token_index_centroids_only_is_compact_and_refuses_token_search(saved_model, tmp_path):
    pytest.importorskip("faiss")
    directory = saved_model[0]
    model_dir, output = str(directory / "m"), str(tmp_path / "tokens")
    build = [
        "index",
        model_dir,
        output,
        "--token-index",
        "--centroids-only",
        "--images",
        str(directory / "images"),
    ]
    assert _cli([*build, "--no-progress"]) == 0
    assert _cli(["search", output, model_dir, "--text", "red circle", "-k", "2", "--no-progress"]) == 0
    with pytest.raises(ValueError, match="centroids only"):
        _cli(["search", output, model_dir, "--text", "red", "--first-stage", "tokens", "--no-progress"])
    with pytest.raises(ValueError, match="--first-stage-tokens must be >= 0"):
        _cli([*build, "--overwrite", "--first-stage-tokens", "-1"])


def _image_folder(root, count, bad=()):
    """`count` random images `img00.png`, ... in `root`; those numbered in `bad` are not images."""
    root.mkdir()
    rng = np.random.default_rng(1)
    for n in range(count):
        target = root / f"img{n:02d}.png"
        if n in bad:
            target.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(target)
    return root


def _index_files(path):
    return {file.name: file.read_bytes() for file in sorted(Path(path).iterdir())}


def _token_search(index, model_dir, out, *options):
    argv = ["search", str(index), model_dir, "--text", "red circle", "blue square", "-k", "4", "--shortlist",
            "6", "--query-tokens", "0", "--output-json", str(out), "--no-progress", *options]  # fmt: skip
    assert _cli(argv) == 0
    return json.loads(out.read_text())["results"]


def test_cli_token_index_streams_chunks_into_the_one_chunk_index(saved_model, tmp_path, capsys, monkeypatch):
    """A gallery encoded and added 3 images at a time (a chunk of unreadable files among them) gives the
    files of a one-chunk build; the gallery size reaches `TokenIndex.create`; errors leave OUTPUT as it
    was."""
    pytest.importorskip("faiss")
    from granalign.retrieval.cli_retrieval import _auto_factory
    from granalign.retrieval.multivector import TokenIndex, resolve_centroids

    model_dir = str(saved_model[0] / "m")
    gallery = _image_folder(tmp_path / "gallery", 13, bad=(3, 4, 5))  # files 3-5: the second chunk

    def build(output, *options):
        argv = ["index", model_dir, str(output), "--token-index", "--images", str(gallery), "--batch-size",
                "3", "--no-progress", *options]  # fmt: skip
        return _cli(argv)

    created = []  # the gallery size (13 files, 3 of them unreadable) reaches create(expected_items=...)
    create = TokenIndex.create.__func__
    monkeypatch.setattr(
        TokenIndex, "create", classmethod(lambda cls, *a, **kw: created.append(kw) or create(cls, *a, **kw))
    )
    chunked, whole = tmp_path / "chunked", tmp_path / "whole"
    assert build(chunked, "--chunk-size", "3", "--skip-bad-images") == 0
    printed = capsys.readouterr().out
    assert "skipped 3 of 13 image files" in printed and "wrote" in printed and "centroids ivf" in printed
    assert [kw["expected_items"] for kw in created] == [13] and created[0]["centroids"] == "auto"
    assert build(whole, "--chunk-size", "1000", "--skip-bad-images") == 0
    files = _index_files(chunked)
    assert files == _index_files(whole)
    index = TokenIndex.open(chunked)
    assert len(index) == 10 and "img03.png" not in " ".join(index.ids)
    nlist = int(index.meta["faiss_factory"][3:].split(",")[0])
    assert index.quantizer_spec == resolve_centroids("auto", 13, 32, nlist) == "ivf"
    assert index.meta["faiss_factory"] == _auto_factory(index.faiss_index.ntotal)  # as from the whole gallery
    out = tmp_path / "hits.json"
    for first_stage in ([], ["--first-stage", "tokens"]):
        assert _token_search(chunked, model_dir, out, *first_stage) == _token_search(
            whole, model_dir, out, *first_stage
        )

    with pytest.raises(ValueError, match="pass --skip-bad-images"):
        build(tmp_path / "failed", "--chunk-size", "3")
    assert not (tmp_path / "failed").exists() and not (tmp_path / "failed.partial").exists()
    with pytest.raises(ValueError, match="pass --skip-bad-images"):
        build(chunked, "--chunk-size", "3", "--overwrite")
    assert _index_files(chunked) == files and not (tmp_path / "chunked.partial").exists()
    more = _image_folder(tmp_path / "more", 5, bad=(4,))  # the first chunk is added before the error
    append = ["index", model_dir, str(chunked), "--token-index", "--append", "--images", str(more),
              "--chunk-size", "3", "--no-progress"]  # fmt: skip
    with pytest.raises(ValueError, match="pass --skip-bad-images"):
        _cli(append)
    assert _index_files(chunked) == files  # rolled back
    assert _cli([*append, "--skip-bad-images"]) == 0
    assert len(TokenIndex.open(chunked)) == 14


def test_cli_token_index_option_errors_name_the_value(saved_model, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    from granalign.retrieval import cli_retrieval

    directory = saved_model[0]
    output = tmp_path / "tokens"
    build = [
        "index",
        str(directory / "m"),
        str(output),
        "--token-index",
        "--images",
        str(directory / "images"),
    ]
    with pytest.raises(
        ValueError, match=r"--chunk-size must be >= 1 \(images encoded and added at a time\), got 0"
    ):
        _cli([*build, "--chunk-size", "0"])
    for spec in ("IMI2x9", "plaid"):
        expected = f"--centroids: unknown centroid quantizer '{spec}'; expected 'auto', 'ivf' or 'IMI2x<b>'"
        with pytest.raises(ValueError, match=expected):
            _cli([*build, "--centroids", spec])
    regions = [
        "index",
        str(directory / "m"),
        str(output),
        "--token-index",
        "--regions",
        str(tmp_path / "r.npz"),
    ]
    with pytest.raises(ValueError, match="--skip-bad-images leaves out unreadable --images files"):
        _cli([*regions, "--skip-bad-images"])  # not silently ignored
    assert not output.exists()
    output.mkdir()
    (output / "meta.json").write_text("{}")
    several = SimpleNamespace(num_processes=2, is_main_process=True, device="cpu")
    monkeypatch.setattr(cli_retrieval, "_process_state", lambda args: contextlib.nullcontext(several))
    with pytest.raises(ValueError, match="--append adds to an index in one process, not 2"):
        _cli([*build, "--append"])


def test_launched_process_group_is_destroyed_however_the_build_ends(monkeypatch):
    """A sharded build tears its process group down itself, on success and on error: left to the
    interpreter's exit, gloo's threads can abort a process whose work is done."""
    import accelerate

    from granalign.retrieval import cli_retrieval

    destroyed = []

    class Launched:  # accelerate's PartialState in one of two launched processes
        num_processes = 2

        def __init__(self, cpu: bool) -> None:
            pass

        def destroy_process_group(self) -> None:
            destroyed.append(True)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "PartialState", Launched)
    args = SimpleNamespace(device="cpu")
    with cli_retrieval._process_state(args) as state:
        assert isinstance(state, Launched)
    assert destroyed == [True]
    with pytest.raises(RuntimeError, match="encoding failed"), cli_retrieval._process_state(args):
        raise RuntimeError("encoding failed")
    assert destroyed == [True, True]
    monkeypatch.setenv("WORLD_SIZE", "3")  # accelerate sees 2 of 3 launched processes
    mismatch = "3 processes were launched, but accelerate runs 2"
    with pytest.raises(ValueError, match=mismatch), cli_retrieval._process_state(args):
        pass
    assert destroyed == [True, True, True]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with cli_retrieval._process_state(args) as state:
        assert state is None


@pytest.mark.slow
def test_cli_token_index_two_processes_equal_one(saved_model, tmp_path):
    """`accelerate launch --num_processes 2 granalign index --token-index` (two CPU processes, gloo): each
    encodes its half in chunks; the merged index equals the one-process build, but for the first stage's
    trained quantizer (trained on the main process's half; with one IVF list the assignments agree)."""
    pytest.importorskip("faiss")
    launcher, granalign = (Path(sys.executable).with_name(name) for name in ("accelerate", "granalign"))
    if not (launcher.is_file() and granalign.is_file()):
        pytest.skip("the accelerate launcher or the granalign script is not installed next to this python")
    model_dir = str(saved_model[0] / "m")
    gallery = _image_folder(tmp_path / "gallery", 10)
    options = ["--token-index", "--images", str(gallery), "--codec", "float32", "--token-factory",
               "IVF1,Flat", "--centroids", "ivf", "--batch-size", "1", "--chunk-size", "2",
               "--no-progress"]  # fmt: skip
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(granalign), "index", model_dir,
               str(tmp_path / "two"), *options]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1, done.stdout  # the main process prints
    assert _cli(["index", model_dir, str(tmp_path / "one"), *options]) == 0
    one, two = _index_files(tmp_path / "one"), _index_files(tmp_path / "two")
    one.pop("first_stage.faiss"), two.pop("first_stage.faiss")
    assert one == two
    out = tmp_path / "hits.json"
    for first_stage in ([], ["--first-stage", "tokens"]):
        expected = _token_search(tmp_path / "one", model_dir, out, *first_stage)
        assert _token_search(tmp_path / "two", model_dir, out, *first_stage) == expected


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_fold_two_stage_scores_shortlist_within_each_fold(encoded, direction):
    model, images, texts = encoded
    text_to_image = [0, 0, 1, 2, 2, 3, 4, 4, 5]  # 6 images, 3 folds of 2 images
    scores = fold_two_stage_scores(model, images, texts, text_to_image, 3, direction, shortlist=1)
    full, first = model.score(images, texts), _first_stage(model, images, texts, "regions")
    expected = torch.full((6, 9), -torch.inf)
    for lo, cols in ((0, slice(0, 3)), (2, slice(3, 6)), (4, slice(6, 9))):
        block = first[lo : lo + 2, cols]
        keep = torch.zeros_like(block, dtype=torch.bool)
        if direction == "i2t":
            keep.scatter_(1, block.topk(1, dim=1).indices, True)
        else:
            keep.scatter_(0, block.topk(1, dim=0).indices, True)
        expected[lo : lo + 2, cols] = torch.where(keep, full[lo : lo + 2, cols], -torch.inf)
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="image-row order"):
        fold_two_stage_scores(model, images, texts, text_to_image[::-1], 3, direction)
