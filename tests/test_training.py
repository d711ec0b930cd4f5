"""Training building blocks: augmentation, tokenizer, pair dataset + collator, sampler, optimiser and
schedules, atomic checkpoint directories, cross-process gathering, the evaluation runner."""

from __future__ import annotations

import io
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from PIL import Image

from granalign import GranAlignConfig, GranAlignModel, concat_image_outputs, concat_text_outputs
from granalign.data.schema import image_features, region_features
from granalign.distributed import all_gather_tensors, gather_output, gather_tensor
from granalign.evaluation.metrics import RECALL_KEYS, retrieval_metrics
from granalign.evaluation.runner import caption_index, evaluate_split, score_split
from granalign.evaluation.two_stage import evaluate_split_two_stage
from granalign.processing_granalign import GranAlignProcessor
from granalign.retrieval import region_level_scores
from granalign.training.augment import CaptionAugmenter, ImageAugmenter, sample_rng, swap_left_right
from granalign.training.builders import scratch_image_processor, skip_bad_rows
from granalign.training.checkpoint import (
    find_latest_checkpoint,
    recover_directory,
    replace_directory,
    resolve_resume,
    warn_recipe_changes,
)
from granalign.training.collate import AlignmentCollator, CaptionPairDataset, EpochPermutationSampler
from granalign.training.optim import LRSchedule, build_optimizer, parameter_groups
from granalign.training.tokenizer import SPECIAL_TOKENS, build_caption_tokenizer

CAPTIONS = [
    ["a red circle on the left", "a red ball left of a blue square"],
    ["a blue square at the top", "there is a big blue box"],
    ["a green star, a white cross", "two shapes: a green star and a white cross"],
]
VISION = {
    "model_type": "vit",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 16,
    "patch_size": 8,
}


def _image(seed: int, size: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size + 4, 3), dtype=np.uint8))


def _image_split() -> Dataset:
    rows = {"image_id": ["a", "b", "c"], "image": [_image(i) for i in range(3)], "captions": CAPTIONS}
    return Dataset.from_dict(rows, features=image_features())


def _processor(split: Dataset, with_images: bool = True) -> GranAlignProcessor:
    tokenizer = build_caption_tokenizer([c for row in split["captions"] for c in row])
    image_processor = scratch_image_processor(VISION) if with_images else None
    return GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=16)


def _model(vocab: int, vision: bool = True) -> GranAlignModel:
    torch.manual_seed(0)
    text = {
        "model_type": "bert",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "vocab_size": vocab,
        "max_position_embeddings": 32,
    }
    kwargs = {"vision_config": VISION} if vision else {"region_feature_dim": 6}
    return GranAlignModel(GranAlignConfig(text_config=text, embed_dim=16, num_regions=3, **kwargs))


# ------------------------------------------------------------------------------------------ augment
def test_caption_augmenter_rates_and_determinism() -> None:
    vocabulary = ("zebra",)
    augment = CaptionAugmenter(vocabulary, "[MASK]", word_prob=0.2)
    words = " ".join(f"w{i}" for i in range(20000))
    out = augment(words, random.Random(0)).split()
    assert augment(words, random.Random(0)).split() == out
    masked, replaced = out.count("[MASK]"), out.count("zebra")
    deleted = 20000 - len(out)
    assert abs(masked / 20000 - 0.10) < 0.01  # p = 0.2 x 50 %
    assert abs(replaced / 20000 - 0.02) < 0.005  # p = 0.2 x 10 %
    assert abs(deleted / 20000 - 0.08) < 0.01  # p = 0.2 x 40 %
    kept = [w for w in out if w.startswith("w")]
    assert kept == sorted(kept, key=lambda w: int(w[1:]))  # order is preserved


def test_caption_augmenter_edge_cases() -> None:
    assert CaptionAugmenter(("x",), word_prob=0.0)("a red star", random.Random(1)) == "a red star"
    delete_all = CaptionAugmenter(("x",), word_prob=1.0, mask_frac=0.0, replace_frac=0.0, delete_frac=1.0)
    assert delete_all("a red star", random.Random(1)) == "a red star"  # never an empty caption
    no_mask = CaptionAugmenter(
        ("x",), mask_token=None, word_prob=1.0, mask_frac=1.0, replace_frac=0, delete_frac=0
    )
    assert no_mask("a red star", random.Random(1)) == "a red star"
    with pytest.raises(ValueError, match="sum to 1"):
        CaptionAugmenter(("x",), mask_frac=0.5, replace_frac=0.5, delete_frac=0.5)


def test_image_augmenter_crop_bounds_size_and_flip() -> None:
    augment = ImageAugmenter((16, 12), scale=(0.6, 1.0))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = augment.crop_box(40, 30, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.55 <= (right - left) * (bottom - top) / 1200 <= 1.0
    image = _image(3)
    out, _ = augment(image, sample_rng(0, 0, 5))
    assert out.size == (12, 16)
    again, _ = augment(image, sample_rng(0, 0, 5))
    assert np.array_equal(np.asarray(out), np.asarray(again))
    other, _ = augment(image, sample_rng(0, 1, 5))
    assert not np.array_equal(np.asarray(out), np.asarray(other))
    square = _image(4, size=20).crop((0, 0, 20, 20))
    whole = ImageAugmenter((20, 20), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    flipped, was_flipped = whole(square, random.Random(0))
    assert was_flipped
    assert np.array_equal(np.asarray(flipped), np.asarray(square)[:, ::-1])


def test_swap_left_right() -> None:
    assert swap_left_right("a star left of a box, on the right.") == "a star right of a box, on the left."
    assert swap_left_right("leftover") == "leftover"


# ---------------------------------------------------------------------------------------- tokenizer
def test_caption_tokenizer_maps_every_word_to_one_id(tmp_path: Path) -> None:
    captions = [c for row in CAPTIONS for c in row]
    tokenizer = build_caption_tokenizer(captions)
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    ids = tokenizer("two shapes: a green star [MASK]")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "two",
        "shapes",
        ":",
        "a",
        "green",
        "star",
        "[MASK]",
        "[SEP]",
    ]
    assert tokenizer.unk_token_id not in tokenizer("Greenbox")["input_ids"]  # falls back to characters
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(tmp_path)("a red ball")["input_ids"]
        == tokenizer("a red ball")["input_ids"]
    )


# -------------------------------------------------------------------------------- pairs and collator
def test_pair_dataset_and_collator_for_images() -> None:
    split = _image_split()
    processor = _processor(split)
    pairs = CaptionPairDataset(split)
    assert len(pairs) == 6
    assert [pairs[i]["image_index"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert pairs[3]["caption"] == CAPTIONS[1][1]
    batch = AlignmentCollator(processor)([pairs[i] for i in (5, 0, 1)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].dtype == torch.long
    assert batch["image_ids"].tolist() == [2, 0, 0]


def test_pair_dataset_augmentation_depends_on_epoch_only_through_set_epoch() -> None:
    split = _image_split()
    pairs = CaptionPairDataset(
        split, ImageAugmenter((16, 16)), CaptionAugmenter(("x",), word_prob=0.5), seed=1
    )
    first = [pairs[i] for i in range(6)]
    again = [pairs[i] for i in reversed(range(6))][::-1]  # access order does not matter
    assert [f["caption"] for f in first] == [a["caption"] for a in again]
    assert all(
        np.array_equal(np.asarray(f["image"]), np.asarray(a["image"]))
        for f, a in zip(first, again, strict=True)
    )
    pairs.set_epoch(1)
    assert [pairs[i]["caption"] for i in range(6)] != [f["caption"] for f in first]


def test_pair_dataset_and_collator_for_region_features() -> None:
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 6)).astype(np.float32) for n in (2, 4, 3)]
    split = Dataset.from_dict(
        {"image_id": ["a", "b", "c"], "region_features": feats, "captions": CAPTIONS},
        features=region_features(6),
    )
    processor = _processor(split, with_images=False)
    pairs = CaptionPairDataset(split)
    assert np.allclose(pairs[3]["region_features"], feats[1])
    batch = AlignmentCollator(processor)([pairs[i] for i in (0, 3, 5)])
    assert batch["region_features"].shape == (3, 4, 6)
    assert batch["region_mask"].sum(1).tolist() == [2, 4, 3]
    model = _model(len(processor.tokenizer), vision=False)
    out = model(**{k: v for k, v in batch.items()}, return_loss=True)
    assert torch.isfinite(out.loss)


def test_epoch_permutation_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    sampler = EpochPermutationSampler(50, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    assert list(EpochPermutationSampler(50, seed=3).__iter__()) != order  # epoch 0 differs
    torch.manual_seed(123)  # the global generator plays no part
    again = EpochPermutationSampler(50, seed=3)
    again.set_epoch(2)
    assert list(again) == order


def test_skip_bad_rows_counts_unreadable_images(tmp_path: Path) -> None:
    good = io.BytesIO()
    _image(0).save(good, format="PNG")
    rows = {
        "image_id": ["ok", "bad"],
        "captions": CAPTIONS[:2],
        "image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}],
    }
    split = Dataset.from_dict(rows, features=image_features())
    kept, bad = skip_bad_rows(split, skip=True)
    assert bad == 1 and kept["image_id"] == ["ok"]
    assert skip_bad_rows(split, skip=False)[1] == 0


# ----------------------------------------------------------------------------------- optimiser, lr
def test_parameter_groups_split_towers_and_decay() -> None:
    model = _model(40)
    groups = {
        g["name"]: g for g in parameter_groups(model, lr=1e-3, backbone_lr_multiplier=0.1, weight_decay=0.5)
    }
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "new_decay", "new_no_decay"}
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4) and groups["new_decay"]["lr"] == 1e-3
    assert groups["new_no_decay"]["weight_decay"] == 0.0 and groups["new_decay"]["weight_decay"] == 0.5
    towers = {id(p) for p in [*model.vision_model.parameters(), *model.text_model.parameters()]}
    assert {id(p) for g in groups.values() if g["name"].startswith("backbone") for p in g["params"]} == towers
    assert all(p.dim() < 2 for p in groups["new_no_decay"]["params"])
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len([p for p in model.parameters() if p.requires_grad])
    optimizer = build_optimizer(model, lr=1e-3)
    assert len(optimizer.param_groups) == 4


def test_schedules() -> None:
    step = LRSchedule("step", steps_per_epoch=10, total_steps=300, milestones=(9, 15), gamma=0.3)
    assert step(0) == 1.0 and step(89) == 1.0
    assert step(90) == pytest.approx(0.3) and step(150) == pytest.approx(0.09)
    cosine = LRSchedule("cosine", steps_per_epoch=10, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        LRSchedule("linear", 1, 1)
    from granalign.training.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["train.epochs=4"])
    from_recipe = LRSchedule.from_recipe(recipe.optim, recipe.train, steps_per_epoch=10)
    o = recipe.optim
    assert from_recipe == LRSchedule("cosine", 10, 40, tuple(o.milestones), o.gamma, 20, o.min_lr_ratio)


# ---------------------------------------------------------------------------------------- checkpoints
def test_replace_directory_and_latest_pointer(tmp_path: Path) -> None:
    target = tmp_path / "best"
    for content in ("one", "two"):
        tmp = tmp_path / ".tmp-best"
        tmp.mkdir()
        (tmp / "f.txt").write_text(content)
        replace_directory(tmp, target)
    assert (target / "f.txt").read_text() == "two" and not (tmp_path / "best.old").exists()
    os.replace(target, tmp_path / "best.old")  # a crash between the two renames
    recover_directory(target)
    assert (target / "f.txt").read_text() == "two"
    root = tmp_path / "run" / "checkpoints"
    for name in ("step-00000004", "step-00000008", ".tmp-step-00000012"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    assert find_latest_checkpoint(tmp_path / "run").name == "step-00000008"  # the temp dir is incomplete
    (root / "latest").write_text("step-00000004\n")
    assert find_latest_checkpoint(tmp_path / "run").name == "step-00000004"
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_resume_resolution_and_changed_recipe_warning(tmp_path: Path) -> None:
    from granalign.training.recipe import load_recipe, save_recipe

    assert resolve_resume(False, tmp_path) is None
    assert resolve_resume(True, tmp_path) is None  # nothing saved yet: a fresh start
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    configs = Path(__file__).resolve().parents[1] / "configs"
    saved = save_recipe(load_recipe(configs / "tiny.yaml"), tmp_path / "recipe.yaml")
    printed: list[str] = []
    accelerator = type("A", (), {"print": staticmethod(printed.append)})()
    warn_recipe_changes(accelerator, load_recipe(saved, ["train.max_steps=5"]), saved)
    assert printed == []  # stopping early is not a change
    warn_recipe_changes(accelerator, load_recipe(saved, ["train.batch_size=8", "optim.lr=0.1"]), saved)
    assert len(printed) == 1 and "optim.lr, train.batch_size" in printed[0]


# ------------------------------------------------------------------------------------------- gather
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, port: int, queue: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Different batch sizes and token lengths per process.
        local = torch.full((rank + 1, 2 + rank), float(rank + 1), requires_grad=True)
        parts = all_gather_tensors(local)
        shapes = [tuple(p.shape) for p in parts]
        assert parts[rank] is local and not parts[1 - rank].requires_grad
        merged = gather_tensor(torch.tensor([rank, rank]))
        # Gradient equivalence: loss on the global batch, x W, averaged over processes as DDP does,
        # equals the single-process gradient of the same global batch.
        model = _model(30).eval()
        torch.manual_seed(1)
        pixels = torch.randn(4, 3, 16, 16)
        ids = torch.randint(5, 30, (4, 7))
        mask = torch.ones_like(ids)
        mask[1:, 5:] = 0  # rows 1-3 are padded after 5 tokens
        ids[1:, 5:] = 0
        image_ids = torch.tensor([0, 1, 1, 2])
        half = slice(2 * rank, 2 * rank + 2)
        length = 7 if rank == 0 else 5  # token lengths differ across processes: gathering pads them
        image = gather_output(model.encode_image(pixel_values=pixels[half]), concat_image_outputs)
        text = gather_output(model.encode_text(ids[half, :length], mask[half, :length]), concat_text_outputs)
        loss = model.compute_loss(image, text, gather_tensor(image_ids[half]), hardest_negative=True).loss
        (loss * 2).backward()
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                grads[name] = param.grad / 2
        if rank == 0:
            reference = _model(30).eval()
            full = reference.compute_loss(
                reference.encode_image(pixel_values=pixels), reference.encode_text(ids, mask), image_ids, True
            ).loss
            full.backward()
            diffs = {
                n: (grads[n] - p.grad).abs().max().item()
                for n, p in reference.named_parameters()
                if p.grad is not None
            }
            queue.put((shapes, merged.tolist(), loss.item(), full.item(), max(diffs.values()), len(diffs)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_across_two_processes_keeps_local_gradients_and_matches_one_process() -> None:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gather_worker, args=(_free_port(), queue), nprocs=2, join=True)
    shapes, merged, loss, full, max_diff, num_grads = queue.get()
    assert shapes == [(1, 2), (2, 3)]
    assert merged == [0, 0, 1, 1]
    assert loss == pytest.approx(full, abs=1e-5)
    assert num_grads > 20 and max_diff < 1e-5


# ------------------------------------------------------------------------------------------ runner
def test_evaluate_split_matches_brute_force_scores() -> None:
    split = _image_split()
    processor = _processor(split)
    model = _model(len(processor.tokenizer)).eval()
    captions, text_to_image = caption_index(split)
    assert text_to_image == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        images = model.encode_image(**{k: v for k, v in processor(images=list(split["image"])).items()})
        texts = model.encode_text(**processor(text=captions, padding="max_length"))
        reference = model.score(images, texts)
    model.train()
    scores, t2i = score_split(model, processor, split, batch_size=2, image_chunk_size=1, text_chunk_size=4)
    assert model.training  # the mode is restored
    assert t2i == text_to_image
    assert torch.allclose(scores, reference, atol=1e-5)
    result = evaluate_split(model, processor, split, "all", batch_size=2, progress=False)
    assert set(result["metrics"]) >= {"i2t_r1", "t2i_r10", "rsum"}
    with pytest.raises(ValueError, match="expects 1000 images"):
        evaluate_split(model, processor, split, "flickr30k-1k", progress=False)


def test_evaluation_scores_what_the_gallery_encode_path_encodes() -> None:
    from granalign.retrieval import encode_captions, encode_dataset_images

    split = _image_split()
    processor = _processor(split)
    model = _model(len(processor.tokenizer)).eval()
    scores, _ = score_split(model, processor, split, batch_size=2, progress=False)
    captions, _ = caption_index(split)
    images, ids = encode_dataset_images(model, processor, split, batch_size=3, progress=False)
    texts = encode_captions(model, processor, captions, batch_size=3, progress=False)
    torch.testing.assert_close(scores, model.score(images, texts), atol=1e-5, rtol=1e-5)
    part, part_ids = encode_dataset_images(model, processor, split, 1, False, rows=range(1, 3))
    assert ids == ["a", "b", "c"] and part_ids == ["b", "c"]
    torch.testing.assert_close(part.tokens, images.tokens[1:3])


def test_two_stage_evaluation_reports_the_recall_a_shortlist_loses() -> None:
    split = _image_split()
    processor = _processor(split)
    model = _model(len(processor.tokenizer)).eval()
    exhaustive = evaluate_split(model, processor, split, "all", batch_size=2, progress=False)
    full = evaluate_split_two_stage(
        model, processor, split, "all", shortlist=10, batch_size=2, progress=False
    )
    assert full["exhaustive"]["metrics"] == pytest.approx(exhaustive["metrics"])
    assert full["two_stage"]["metrics"] == pytest.approx(exhaustive["metrics"])  # nothing left out
    assert all(value == 0 for value in full["recall_lost"].values())

    captions, text_to_image = caption_index(split)
    with torch.no_grad():
        images = model.encode_image(**processor(images=list(split["image"])))
        texts = model.encode_text(**processor(text=captions, padding="longest"))
        scores = model.score(images, texts)
        first = region_level_scores(images, texts, model.config.similarity_negative_slope)
    i2t_only = torch.full_like(scores, -torch.inf).scatter(1, first.topk(1, dim=1).indices, 0) + scores
    t2i_only = torch.full_like(scores, -torch.inf).scatter(0, first.topk(1, dim=0).indices, 0) + scores
    expected_i2t, expected_t2i = (
        retrieval_metrics(i2t_only, text_to_image),
        retrieval_metrics(t2i_only, text_to_image),
    )
    short = evaluate_split_two_stage(
        model, processor, split, "all", shortlist=1, batch_size=2, progress=False
    )
    got = short["two_stage"]["metrics"]
    assert {k: got[k] for k in got if k.startswith("i2t")} == pytest.approx(
        {k: v for k, v in expected_i2t.items() if k.startswith("i2t")}
    )
    assert {k: got[k] for k in got if k.startswith("t2i")} == pytest.approx(
        {k: v for k, v in expected_t2i.items() if k.startswith("t2i")}
    )
    assert got["rsum"] == pytest.approx(sum(got[k] for k in RECALL_KEYS))
    assert short["recall_lost"]["rsum"] == pytest.approx(exhaustive["metrics"]["rsum"] - got["rsum"])
