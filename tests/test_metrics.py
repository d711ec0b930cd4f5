"""Retrieval metrics, evaluation protocols, reports and the `evaluate` metric module."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from granalign.evaluation import (
    METRIC_KEYS,
    PROTOCOLS,
    RETRIEVAL_METRIC_PATH,
    evaluate_protocol,
    evaluate_protocols,
    fold_metrics,
    format_metrics_table,
    retrieval_metrics,
    retrieval_ranks,
    save_metrics_json,
    text_to_image_from_caption_ids,
)

os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")


# ----------------------------------------------------------------------------- brute-force reference
def reference_metrics(scores: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
    """Loop over queries, sort candidates (negatives before positives on ties), take the first positive."""
    scores = np.asarray(scores, dtype=np.float64)
    num_images, num_texts = scores.shape
    i2t_ranks = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda j: (-scores[i, j], bool(text_to_image[j] == i)))
        i2t_ranks.append(1 + next(pos for pos, j in enumerate(order) if text_to_image[j] == i))
    t2i_ranks = []
    for j in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-scores[i, j], bool(i == text_to_image[j])))
        t2i_ranks.append(1 + order.index(text_to_image[j]))
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(math.floor(statistics.median(ranks)))
        out[f"{name}_meanr"] = sum(ranks) / len(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def five_per_image(num_images: int) -> np.ndarray:
    return np.repeat(np.arange(num_images), 5)


def variable_per_image(num_images: int, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(np.arange(num_images), rng.integers(1, 8, size=num_images))


def assert_same(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(METRIC_KEYS)
    assert actual == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- retrieval_metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_five_captions_per_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t2i = five_per_image(30)
    scores = rng.standard_normal((30, t2i.size)).astype(np.float32)
    scores[t2i, np.arange(t2i.size)] += 1.5  # make recalls non-trivial
    assert_same(retrieval_metrics(scores, t2i), reference_metrics(scores, t2i))


@pytest.mark.parametrize("seed", [3, 4])
def test_matches_reference_variable_captions_per_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t2i = variable_per_image(25, rng)
    scores = rng.standard_normal((25, t2i.size))
    scores[t2i, np.arange(t2i.size)] += 1.0
    assert_same(retrieval_metrics(scores, t2i), reference_metrics(scores, t2i))


@pytest.mark.parametrize("variable", [False, True])
def test_matches_reference_with_many_ties(variable: bool) -> None:
    rng = np.random.default_rng(5)
    t2i = variable_per_image(20, rng) if variable else five_per_image(20)
    scores = rng.integers(0, 3, size=(20, t2i.size)).astype(np.float32)  # integer-valued: ties everywhere
    expected = reference_metrics(scores, t2i)
    assert_same(retrieval_metrics(scores, t2i), expected)
    assert_same(retrieval_metrics(scores.astype(np.int64), t2i), expected)  # integer dtype accepted


def test_perfect_scorer() -> None:
    t2i = five_per_image(12)
    scores = np.zeros((12, t2i.size), dtype=np.float32)
    scores[t2i, np.arange(t2i.size)] = 1.0
    result = retrieval_metrics(scores, t2i)
    assert_same(result, reference_metrics(scores, t2i))
    assert result["rsum"] == 600.0
    assert result["i2t_medr"] == result["i2t_meanr"] == result["t2i_medr"] == result["t2i_meanr"] == 1.0


def test_reversed_scorer() -> None:
    t2i = five_per_image(12)
    scores = np.ones((12, t2i.size), dtype=np.float32)
    scores[t2i, np.arange(t2i.size)] = 0.0  # every positive scores lowest
    result = retrieval_metrics(scores, t2i)
    assert_same(result, reference_metrics(scores, t2i))
    assert result["rsum"] == 0.0
    assert result["i2t_meanr"] == t2i.size - 5 + 1  # all negatives above the best positive
    assert result["t2i_meanr"] == 12


def test_shuffled_caption_order_gives_identical_metrics() -> None:
    rng = np.random.default_rng(6)
    t2i = variable_per_image(15, rng)
    scores = rng.standard_normal((15, t2i.size))
    perm = rng.permutation(t2i.size)
    assert retrieval_metrics(scores[:, perm], t2i[perm]) == retrieval_metrics(scores, t2i)


def test_constant_scores_count_ties_pessimistically() -> None:
    t2i = np.array([0, 0, 1, 1, 2, 2])
    result = retrieval_metrics(np.zeros((3, 6)), t2i)
    assert result["i2t_r1"] == 0.0 and result["t2i_r1"] == 0.0
    assert result["i2t_meanr"] == 5.0  # 1 + the 4 negatives tied with the positives
    assert result["t2i_meanr"] == 3.0  # behind the 2 tied negative images


def test_ranks_on_a_hand_example() -> None:
    scores = np.array(
        [
            [0.9, 0.9, 0.1, 0.9],  # image 0: positives 0, 1 tie at the top with negative caption 3
            [0.5, 0.2, 0.3, 0.1],  # image 1: positive 2 is beaten only by caption 0
        ]
    )
    i2t, t2i = retrieval_ranks(scores, [0, 0, 1, 1])
    assert i2t.tolist() == [2, 2]  # tied positives do not push each other down; the tied negative does
    assert t2i.tolist() == [1, 1, 1, 2]


def test_chunking_does_not_change_results() -> None:
    rng = np.random.default_rng(7)
    t2i = variable_per_image(17, rng)
    scores = rng.integers(0, 4, size=(17, t2i.size)).astype(np.float64)
    expected = retrieval_metrics(scores, t2i)
    for max_chunk_elements in (1, 7, t2i.size + 3):
        assert retrieval_metrics(scores, t2i, max_chunk_elements=max_chunk_elements) == expected


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(8)
    t2i = five_per_image(10)
    scores = rng.standard_normal((10, 50)).astype(np.float32)
    tensor = torch.from_numpy(scores).requires_grad_(True)
    assert retrieval_metrics(tensor, torch.from_numpy(t2i)) == retrieval_metrics(scores, t2i.tolist())


@pytest.mark.parametrize(
    ("scores", "text_to_image", "match"),
    [
        (np.zeros(6), [0, 0, 1, 1, 2, 2], "2-D"),
        (np.zeros((3, 6)), [0, 0, 1, 1, 2], "5 entries but scores has 6"),
        (np.zeros((3, 6)), [0, 0, 1, 1, 2, 3], r"text_to_image\[5\] = 3 is out of range"),
        (np.zeros((3, 6)), [0, 0, 1, 1, 2, -1], "out of range"),
        (np.zeros((3, 6)), [0, 0, 0, 1, 1, 1], r"1 image\(s\) have none, e.g. rows \[2\]"),
        (np.zeros((3, 6)), [0.0, 0, 1, 1, 2, 2], "integer image indices"),
        ([[0.0, 1.0]], [0, 0], "numpy array or torch tensor"),
    ],
)
def test_invalid_inputs_raise(scores: object, text_to_image: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(scores, text_to_image)


def test_nan_scores_raise() -> None:
    scores = np.zeros((3, 6))
    scores[2, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN .*image row 2"):
        retrieval_metrics(scores, [0, 0, 1, 1, 2, 2])


def test_text_to_image_from_caption_ids() -> None:
    assert text_to_image_from_caption_ids([[2, 0], [1], [3, 4]], num_texts=5).tolist() == [0, 1, 0, 2, 2]
    with pytest.raises(ValueError, match="column 1 is listed 2 times"):
        text_to_image_from_caption_ids([[0, 1], [1]], num_texts=2)
    with pytest.raises(ValueError, match="column 2 is listed 0 times"):
        text_to_image_from_caption_ids([[0], [1]], num_texts=3)
    with pytest.raises(ValueError, match="caption index 5 is out of range"):
        text_to_image_from_caption_ids([[0], [5]], num_texts=2)


# ----------------------------------------------------------------------------- protocols
def test_coco_1k_is_mean_of_hand_sliced_folds() -> None:
    rng = np.random.default_rng(9)
    scores = rng.standard_normal((50, 250)).astype(np.float32)
    t2i = five_per_image(50)
    scores[t2i, np.arange(250)] += 1.0
    result = evaluate_protocol(scores, t2i, "coco-1k", check_size=False)
    hand = [
        retrieval_metrics(scores[10 * k : 10 * k + 10, 50 * k : 50 * k + 50], five_per_image(10))
        for k in range(5)
    ]
    assert result["protocol"] == "coco-1k" and result["num_folds"] == 5
    assert result["folds"] == hand
    for key in METRIC_KEYS:
        assert result["metrics"][key] == pytest.approx(sum(fold[key] for fold in hand) / 5)
    # Folds are not the whole pool: the 1K mean differs from the full-set metrics.
    assert result["metrics"] != retrieval_metrics(scores, t2i)


def test_fold_metrics_follow_captions_wherever_their_columns_are() -> None:
    rng = np.random.default_rng(10)
    t2i = variable_per_image(20, rng)
    scores = rng.standard_normal((20, t2i.size))
    perm = rng.permutation(t2i.size)
    assert fold_metrics(scores[:, perm], t2i[perm], 4)["folds"] == fold_metrics(scores, t2i, 4)["folds"]


@pytest.mark.slow
def test_coco_1k_on_full_size_scorer_perfect_on_fold_0_only() -> None:
    rng = np.random.default_rng(11)
    t2i = np.arange(5000)  # one caption per image keeps the 5K matrix small
    scores = rng.random((5000, 5000), dtype=np.float32)
    scores[np.arange(1000), np.arange(1000)] = 2.0  # perfect on fold 0 only
    result = evaluate_protocol(scores, t2i, "coco-1k")
    assert result["folds"][0]["rsum"] == 600.0
    assert all(fold["rsum"] < 100.0 for fold in result["folds"][1:])  # random: ~R@10 = 1% per fold
    assert result["metrics"]["rsum"] == pytest.approx(np.mean([fold["rsum"] for fold in result["folds"]]))
    assert 120.0 < result["metrics"]["rsum"] < 200.0
    assert evaluate_protocol(scores, t2i, "coco-5k")["folds"] == [retrieval_metrics(scores, t2i)]


def test_whole_set_protocols() -> None:
    rng = np.random.default_rng(12)
    t2i = np.arange(1000)
    scores = rng.standard_normal((1000, 1000)).astype(np.float32)
    expected = retrieval_metrics(scores, t2i)
    flickr = evaluate_protocol(scores, t2i, "flickr30k-1k")
    assert flickr["metrics"] == expected and flickr["folds"] == [expected]
    small = rng.standard_normal((7, 21))
    assert evaluate_protocol(small, np.repeat(np.arange(7), 3), "all")["metrics"] == retrieval_metrics(
        small, np.repeat(np.arange(7), 3)
    )


def test_protocol_errors_name_the_problem() -> None:
    scores, t2i = np.zeros((1000, 1000)), np.arange(1000)
    with pytest.raises(ValueError, match=r"unknown protocol 'coco1k'; known protocols: \['all', 'coco-1k'"):
        evaluate_protocol(scores, t2i, "coco1k")
    with pytest.raises(ValueError, match=r"'coco-1k' .* expects 5000 images, got 1000"):
        evaluate_protocol(scores, t2i, "coco-1k")
    with pytest.raises(ValueError, match="multiple of its 5 folds, got 52 images"):
        evaluate_protocol(np.zeros((52, 52)), np.arange(52), "coco-1k", check_size=False)
    with pytest.raises(ValueError, match="num_folds must be a positive int"):
        fold_metrics(np.zeros((4, 4)), np.arange(4), 0)
    with pytest.raises(ValueError, match="sequence of names"):
        evaluate_protocols(scores, t2i, "coco-5k")
    assert set(PROTOCOLS) == {"all", "flickr30k-1k", "coco-1k", "coco-5k"}


# ----------------------------------------------------------------------------- reports
def _two_protocol_results() -> dict[str, dict]:
    rng = np.random.default_rng(13)
    scores = rng.standard_normal((20, 100))
    return evaluate_protocols(scores, five_per_image(20), ["coco-1k", "all"], check_size=False)


def test_format_metrics_table() -> None:
    results = _two_protocol_results()
    table = format_metrics_table(results)
    lines = table.splitlines()
    header = [
        "protocol",
        "i2t",
        "R@1",
        "i2t",
        "R@5",
        "i2t",
        "R@10",
        "t2i",
        "R@1",
        "t2i",
        "R@5",
        "t2i",
        "R@10",
    ]
    assert lines[0].split() == [*header, "rSum"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    label_width = lines[0].index("i2t R@1")
    labels = [line[:label_width].strip() for line in lines[2:]]
    assert labels == ["coco-1k (mean of 5 folds)", *[f"fold {k}" for k in range(5)], "all"]
    assert lines[2].split()[-1] == f"{results['coco-1k']['metrics']['rsum']:.2f}"
    assert lines[3].split()[-1] == f"{results['coco-1k']['folds'][0]['rsum']:.2f}"
    flat = format_metrics_table(results["all"]["metrics"]).splitlines()
    assert flat[2].split()[0] == "all" and len(flat) == 3
    with pytest.raises(ValueError, match="results\\['x'\\] is not a metrics dict"):
        format_metrics_table({"x": {"foo": 1}})


def test_save_metrics_json_round_trips_atomically(tmp_path: Path) -> None:
    results = _two_protocol_results()
    path = tmp_path / "out" / "metrics.json"
    assert save_metrics_json(results, path) == path
    assert json.loads(path.read_text()) == results
    save_metrics_json({"all": results["all"]}, path)  # overwrites
    assert json.loads(path.read_text()) == {"all": results["all"]}
    with pytest.raises(TypeError):
        save_metrics_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"all": results["all"]}  # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp files left


# ----------------------------------------------------------------------------- evaluate metric
@pytest.fixture(scope="module")
def recall_metric(tmp_path_factory: pytest.TempPathFactory):
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(
        RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path_factory.mktemp("metric")), keep_in_memory=True
    )


def test_metric_directory_ships_script_and_card() -> None:
    folder = Path(RETRIEVAL_METRIC_PATH)
    assert (folder / "retrieval_recall.py").is_file() and (folder / "README.md").is_file()


def test_evaluate_metric_matches_retrieval_metrics(recall_metric) -> None:
    rng = np.random.default_rng(14)
    t2i = variable_per_image(12, rng)
    perm = rng.permutation(t2i.size)
    t2i = t2i[perm]  # captions in arbitrary column order
    scores = rng.standard_normal((12, t2i.size)).astype(np.float32)
    caption_ids = [np.flatnonzero(t2i == i).tolist() for i in range(12)]
    expected = retrieval_metrics(scores, t2i)
    assert recall_metric.compute(predictions=scores, references=caption_ids) == expected
    recall_metric.add_batch(predictions=scores[:5], references=caption_ids[:5])  # streamed image rows
    recall_metric.add_batch(predictions=scores[5:], references=caption_ids[5:])
    assert recall_metric.compute() == expected


def test_evaluate_metric_rejects_bad_references(recall_metric) -> None:
    with pytest.raises(ValueError, match="column 1 is listed 2 times"):
        recall_metric.compute(predictions=[[0.1, 0.2], [0.3, 0.4]], references=[[0, 1], [1]])
