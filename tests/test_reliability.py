"""Nothing silently wrong: non-finite numbers, bad masks and damaged index files are clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_configs import image_inputs, text_inputs, tiny_config, tiny_model

from granalign import GranAlignConfig
from granalign.retrieval import GalleryIndex
from granalign.training.recipe import RecipeError, load_recipe


@pytest.mark.parametrize(
    ("field", "value"),
    [("margin", math.nan), ("kl_loss_weight", math.inf), ("level_weights", [0.4, math.nan, 0.2])],
)
def test_non_finite_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be (a finite number|finite numbers)"):
        tiny_config("vit", **{field: value})


@pytest.mark.parametrize("override", ["model.grm.margin=.nan", "optim.lr=inf", "train.grad_clip=-.inf"])
def test_non_finite_recipe_values_are_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=f"{key} must be a finite number"):
        load_recipe("configs/tiny.yaml", [override])


def test_non_finite_inputs_are_refused_even_in_padding():
    regions = image_inputs(None, batch=3)
    regions["region_features"][2, -1, 0] = math.nan  # image 2's last region is padding
    assert regions["region_mask"][2, -1] == 0
    with pytest.raises(ValueError, match="region_features holds NaN or infinite values"):
        tiny_model(None).encode_image(**regions)
    pixels = image_inputs("vit", batch=2)["pixel_values"]
    pixels[1, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
        tiny_model("vit").encode_image(pixels)


def test_masks_must_be_zero_one_and_of_the_inputs_shape():
    model = tiny_model(None)
    regions = image_inputs(None, batch=2)
    weights = regions["region_mask"].float() * 0.5
    with pytest.raises(ValueError, match="region_mask must hold only 0 and 1"):
        model.encode_image(region_features=regions["region_features"], region_mask=weights)
    with pytest.raises(ValueError, match=r"region_mask must have shape \[2, 6\]"):
        model.encode_image(
            region_features=regions["region_features"], region_mask=regions["region_mask"][:, :4]
        )
    captions = text_inputs(batch=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model.encode_text(captions["input_ids"], captions["attention_mask"] * 2)
    float_mask = regions["region_mask"].float()  # 0./1. floats are a valid mask
    model.encode_image(region_features=regions["region_features"], region_mask=float_mask)


def _index(modality="image"):
    model = tiny_model(None).eval()
    with torch.no_grad():
        if modality == "image":
            return model, model.encode_image(**image_inputs(None, batch=4))
        return model, model.encode_text(**text_inputs(batch=4))


def test_an_index_with_nan_is_refused_naming_the_items():
    model, images = _index()
    images.region_tokens[2, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"region_tokens holds NaN or infinite values, at items \[2\]"):
        GalleryIndex.build(model, images, ids=list("abcd"))


def test_damaged_index_files_are_clear_errors(tmp_path):
    model, images = _index()
    path = GalleryIndex.build(model, images, ids=list("abcd")).save(tmp_path / "g.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a safetensors file at all")
    for bad in (truncated, foreign):
        with pytest.raises(ValueError, match="is not a readable gallery index"):
            GalleryIndex.load(bad)

    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    cases = {
        "modality": ({**meta, "modality": "audio"}, tensors, "unknown index modality 'audio'"),
        "missing": (
            meta,
            {k: v for k, v in tensors.items() if k != "keep_weights"},
            r"lacks \['keep_weights'\]",
        ),
        "ids": ({**meta, "ids": "[not json"}, tensors, "not valid JSON"),
        "shapes": (meta, {**tensors, "keep_weights": tensors["keep_weights"][:, :3]}, "tensors disagree"),
        "nan": (meta, {**tensors, "image_embeds": tensors["image_embeds"] * math.nan}, "NaN or infinite"),
    }
    for name, (header, fields, message) in cases.items():
        edited = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in fields.items()}, str(edited), metadata=header)
        with pytest.raises(ValueError, match=message):
            GalleryIndex.load(edited)


def test_default_config_round_trips_with_its_towers(tmp_path):
    GranAlignConfig().save_pretrained(tmp_path)
    loaded = GranAlignConfig.from_pretrained(tmp_path)
    assert loaded.vision_config.model_type == "vit" and loaded.text_config.model_type == "bert"


def _cosine_run(total_steps: int, steps_taken: int):
    from granalign.training.optim import LRSchedule, build_scheduler

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    scheduler = build_scheduler(optimizer, LRSchedule("cosine", steps_per_epoch=5, total_steps=total_steps))
    for _ in range(steps_taken):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_resume_with_more_epochs_recomputes_the_schedule():
    """`--set train.epochs=4 --resume` after a 2-epoch run: the extra epochs must not train at lr 0."""
    from granalign.training.checkpoint import restore_scheduler_position

    _, finished = _cosine_run(total_steps=10, steps_taken=10)
    saved = finished.state_dict()
    assert finished.get_last_lr()[0] == pytest.approx(0.0)  # the 2-epoch cosine ended at lr 0
    optimizer, longer = _cosine_run(total_steps=20, steps_taken=0)
    restore_scheduler_position(longer, saved)
    assert longer.last_epoch == 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # halfway through the 4-epoch cosine
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))

    _, midway = _cosine_run(total_steps=10, steps_taken=4)  # an unchanged recipe resumes exactly
    optimizer, same = _cosine_run(total_steps=10, steps_taken=0)
    restore_scheduler_position(same, midway.state_dict())
    assert optimizer.param_groups[0]["lr"] == midway.optimizer.param_groups[0]["lr"]


def test_training_into_another_runs_directory_is_refused_or_replaces_it(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from granalign.training.checkpoint import claim_output_dir
    from granalign.training.loop import train

    ended = []
    monkeypatch.setattr(Accelerator, "end_training", lambda self: ended.append(self))
    (tmp_path / "final").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")  # not a run's file: never touched
    recipe = load_recipe("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(FileExistsError, match=r"holds another run \(final, metrics.json\): pass --resume"):
        train(recipe)  # refused before any data is loaded
    assert len(ended) == 1  # a failed run still ends its trackers and process group
    claim_output_dir(tmp_path, resume=True, overwrite=False)  # resuming it is fine
    assert (tmp_path / "final").is_dir()
    claim_output_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    claim_output_dir(tmp_path, resume=False, overwrite=False)  # now empty of runs: accepted


def test_cli_train_refuses_another_runs_directory(tmp_path, capsys):
    from granalign.cli import main

    (tmp_path / "checkpoints").mkdir()
    assert main(["train", "configs/tiny.yaml", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "holds another run (checkpoints)" in error and "--overwrite-output-dir" in error
    assert "Traceback" not in error


def test_a_failed_index_write_says_so_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import granalign.retrieval.index as index_module

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    model, images = _index()
    index = GalleryIndex.build(model, images, ids=list("abcd"))
    monkeypatch.setattr(index_module, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write the gallery index .*No space left on device"):
        index.save(tmp_path / "g.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_faiss_factory_is_a_clear_error():
    pytest.importorskip("faiss")
    from granalign.retrieval.shortlist import EmbeddingShortlist

    gallery = EmbeddingShortlist(torch.nn.functional.normalize(torch.randn(20, 8), dim=-1), "NotAFactory")
    with pytest.raises(ValueError, match=r"FAISS could not build index 'NotAFactory'.*index_factory string"):
        gallery.topk(torch.randn(2, 8), 3, backend="faiss")


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "unknown device 'gpu'; expected cpu, cuda"), ("cuda:7", "device 'cuda:7'")],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(device, message):
    from granalign.hub.loading import check_device

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(ValueError, match=message):
        check_device(device)
    assert check_device("cpu") == "cpu"


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_a_damaged_weights_file_is_a_clear_error(tmp_path, damage):
    from granalign.hub.loading import load_model_and_processor

    tiny_model(None).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "foreign": b"<html>" * 20}[damage]
    )
    with pytest.raises(ValueError, match=r"its model\.safetensors is damaged or not a safetensors file"):
        load_model_and_processor(str(tmp_path), require_processor=False)


def test_index_refuses_unknown_dataset_args_as_train_does():
    import argparse

    from granalign.retrieval.cli_retrieval import _load_split

    args = argparse.Namespace(dataset="builtin", dataset_arg=["num_tset=5"], split="test")
    with pytest.raises(RecipeError, match=r"data.args \['num_tset'\] do not fit source 'builtin'"):
        _load_split(args)


def test_the_demo_serves_only_images_under_its_root(tmp_path):
    from PIL import Image

    from granalign.viz.index_search import resolve_image

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (4, 4)).save(root / "cat.png")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    assert resolve_image("cat", root) == root / "cat.png"
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        resolve_image("../outside/secret.png", root)
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        resolve_image("../outside/secret.png")  # no root: stored paths, but never '..'
    with pytest.raises(ValueError, match="is absolute; with an image root"):
        resolve_image(str(outside / "secret.png"), root)
    with pytest.raises(ValueError, match="resolves outside the image root"):
        resolve_image("link.png", root)


@pytest.fixture
def saved_model(tmp_path):
    from tiny_configs import IMAGE_SIZE, tiny_tokenizer
    from transformers import ViTImageProcessor

    from granalign import GranAlignProcessor

    processor = GranAlignProcessor(
        image_processor=ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tiny_tokenizer(tmp_path),
        max_length=16,
    )
    tiny_model("vit").save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_push_dry_run_loads_and_checks_what_it_would_push(saved_model, capsys):
    import json

    from granalign.cli import main

    assert main(["push", str(saved_model), "--repo-id", "me/tiny", "--dry-run"]) == 0
    capsys.readouterr()
    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(["push", str(saved_model), "--repo-id", "me/tiny", "--dry-run"]) == 2
    assert "its weights are damaged or not safetensors" in capsys.readouterr().err
    weights.write_bytes(data)
    config = json.loads((saved_model / "config.json").read_text())
    (saved_model / "config.json").write_text(json.dumps({**config, "embed_dim": 16}))  # another architecture
    assert main(["push", str(saved_model), "--repo-id", "me/tiny", "--dry-run"]) == 2
    assert "the weights do not fit its config.json" in capsys.readouterr().err


def test_push_to_an_unreachable_endpoint_names_it(saved_model, monkeypatch):
    import huggingface_hub

    from granalign.hub.push import push_model_dir

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline

    with pytest.raises(OSError, match=r"could not reach the Hub at http://127\.0\.0\.1:9"):
        push_model_dir(saved_model, "me/tiny", token="hf_test", endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("what", ["processor", "model"])
def test_processor_and_model_pushes_to_an_unreachable_endpoint_name_it(saved_model, monkeypatch, what):
    import huggingface_hub

    from granalign import GranAlignModel, GranAlignProcessor

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    loaded = (GranAlignProcessor if what == "processor" else GranAlignModel).from_pretrained(saved_model)
    with pytest.raises(OSError, match=r"could not reach the Hub at http://127\.0\.0\.1:9"):
        loaded.push_to_hub("me/tiny", token="hf_test", endpoint="http://127.0.0.1:9")


def _image_folder(folder, bad=("b.png", "d.png", "e.jpg")):
    """Readable a.png and c.png, and the `bad` files: truncated b.png, empty d.png, text e.jpg."""
    from PIL import Image

    folder.mkdir()
    for name, colour in (("a.png", (255, 0, 0)), ("c.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(folder / name)
    damaged = {"b.png": (folder / "a.png").read_bytes()[:70], "d.png": b"", "e.jpg": b"not an image\n"}
    for name in bad:
        (folder / name).write_bytes(damaged[name])
    return folder


def _one_error_line(stderr: str, command: str) -> str:
    """The one line a failed command printed (transformers' weight-loading progress bars aside)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"granalign {command}: error: "), lines[0]
    return lines[0]


def test_index_names_an_unreadable_image_in_one_line(saved_model, tmp_path, capsys):
    from granalign.cli import main

    folder, output = _image_folder(tmp_path / "images"), tmp_path / "g.safetensors"
    assert main(["index", str(saved_model), str(output), "--images", str(folder), "--no-progress"]) == 2
    error = _one_error_line(capsys.readouterr().err, "index")
    assert f"cannot read image file '{folder / 'b.png'}'" in error and "--skip-bad-images" in error
    assert not output.exists()
    for name in ("d.png", "e.jpg"):  # empty, not an image
        assert main(["index", str(saved_model), str(output), "--images", str(folder / name)]) == 2
        error = _one_error_line(capsys.readouterr().err, "index")
        assert f"cannot read image file '{folder / name}'" in error
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\n")
    assert main(["index", str(saved_model), str(output), "--captions-file", str(captions)]) == 0
    search = ["search", str(output), str(saved_model), "--no-progress", "--image", str(folder / "b.png")]
    assert main(search) == 2  # a query image too
    error = _one_error_line(capsys.readouterr().err, "search")
    assert f"cannot read image file '{folder / 'b.png'}'" in error


def test_index_skip_bad_images_lists_them_and_keeps_ids_and_vectors_aligned(saved_model, tmp_path, capsys):
    from granalign.cli import main

    folder = _image_folder(tmp_path / "images")
    mixed, clean = tmp_path / "mixed.safetensors", tmp_path / "clean.safetensors"
    # batches of two: [a, b] loses b, [c, d] loses d, [e] loses all of itself
    argv = ["index", str(saved_model), str(mixed), "--images", str(folder), "--skip-bad-images"]
    assert main([*argv, "--no-progress", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 3 of 5 image files that cannot be read:" in printed
    for name in ("b.png", "d.png", "e.jpg"):
        assert f"cannot read image file '{folder / name}'" in printed
    good = [str(folder / "a.png"), str(folder / "c.png")]
    assert main(["index", str(saved_model), str(clean), "--images", *good, "--no-progress"]) == 0
    index, reference = GalleryIndex.load(mixed), GalleryIndex.load(clean)
    assert index.ids == reference.ids == good
    for name in ("tokens", "image_embeds"):
        torch.testing.assert_close(getattr(index.outputs, name), getattr(reference.outputs, name))

    only_bad = _image_folder(tmp_path / "bad", bad=("b.png", "d.png"))
    for name in ("a.png", "c.png"):
        (only_bad / name).unlink()
    argv = ["index", str(saved_model), str(tmp_path / "x.safetensors"), "--images", str(only_bad)]
    assert main([*argv, "--skip-bad-images", "--no-progress"]) == 2
    assert "none of the 2 image files can be read" in capsys.readouterr().err
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\n")
    argv = ["index", str(saved_model), str(tmp_path / "t.safetensors"), "--captions-file", str(captions)]
    assert main([*argv, "--skip-bad-images"]) == 2
    assert "use it with --images" in capsys.readouterr().err


def test_one_image_loader_everywhere_16_bit_alpha_and_palette(tmp_path):
    import numpy as np
    from PIL import Image

    from granalign.processing_granalign import open_image, to_rgb_pil
    from granalign.viz.explain import load_image

    sixteen = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(sixteen)  # 16-bit, mid-grey
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(rgba)  # fully transparent red: white
    palette = tmp_path / "palette.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(palette)
    expected = {sixteen: (117, 117, 117), rgba: (255, 255, 255), palette: (0, 0, 255)}
    for path, pixel in expected.items():
        for loaded in (open_image(path), load_image(path), to_rgb_pil(str(path))):  # processor, explain
            assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == pixel, (
                path.name,
                loaded.getpixel((3, 3)),
            )


def test_image_files_too_large_truncated_or_foreign_are_clear_errors(tmp_path, monkeypatch):
    from PIL import Image

    from granalign.processing_granalign import MAX_IMAGE_PIXELS_VARIABLE, open_image

    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_VARIABLE, "1000")
    with pytest.raises(ValueError, match=r"big\.png' is 40x30 = 1200 pixels, more than the limit of 1000"):
        open_image(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_VARIABLE, "2000")
    assert open_image(path).size == (40, 30)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    foreign = tmp_path / "foreign.png"
    foreign.write_text("not an image")
    damaged = tmp_path / "damaged.ppm"  # Pillow raises a bare ValueError (int() of the size field) on it
    damaged.write_bytes(b"P6\n1\xdb 9\n255\n")
    for bad in (truncated, foreign, damaged):
        with pytest.raises(ValueError, match=f"cannot read image file '{bad}'"):
            open_image(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image(tmp_path / "missing.png")


def test_caption_lengths_the_text_tower_cannot_take_are_refused(tmp_path):
    from tiny_configs import tiny_tokenizer

    from granalign import GranAlignProcessor

    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.model_max_length = 64  # the tiny text tower's max_position_embeddings
    processor = GranAlignProcessor(tokenizer=tokenizer, max_length=16)
    long_caption = "red " * 100
    assert processor(text=[long_caption, "dog"])["input_ids"].shape == (2, 16)  # truncated by default
    message = r"text\[0\] is 102 tokens long, more than the tokenizer's model_max_length=64"
    for truncation in (False, "do_not_truncate"):
        with pytest.raises(ValueError, match=message):
            processor(text=[long_caption, "dog"], truncation=truncation, padding="longest")
    short = processor(text=["red " * 30, "dog"], truncation=False, padding="longest")
    assert short["input_ids"].shape == (2, 32)  # within the tower's positions: allowed
    model = tiny_model(None)
    model.encode_text(short["input_ids"], short["attention_mask"])
    # a tokenizer that does not know the tower's limit: the model names it, not an index error in torch
    tokenizer.model_max_length = 10**9
    longer = processor(text=[long_caption], truncation=False, padding="longest")
    positions = model.config.text_config.max_position_embeddings
    with pytest.raises(
        ValueError, match=f"102 tokens long, more than the text tower's max_position_embeddings={positions}"
    ):
        model.encode_text(longer["input_ids"], longer["attention_mask"])
    # at or below the 2 special tokens BERT adds, the tokenizer returns the whole caption or no word of it
    assert processor(text="a red dog", max_length=3)["input_ids"].shape == (1, 3)
    for length in (1, 2):
        with pytest.raises(ValueError, match=f"max_length={length} leaves no room for words: .* 2 special"):
            processor(text="a red dog", max_length=length)
    with pytest.raises(ValueError, match="max_length=2 leaves no room for words"):
        GranAlignProcessor(tokenizer=tokenizer, max_length=2)


def test_missing_or_foreign_tokenizer_files_are_an_error(saved_model, tmp_path):
    from granalign.hub.loading import load_model_and_processor

    load_model_and_processor(str(saved_model))  # complete: loads
    for name in ("tokenizer.json", "vocab.txt"):
        (saved_model / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has only its 5 special tokens: its vocabulary files"):
        load_model_and_processor(str(saved_model))


def test_a_tokenizer_larger_than_the_text_tower_is_refused(saved_model):
    from tiny_configs import TEXT_TOWERS, VISION_TOWERS

    from granalign import GranAlignModel
    from granalign.hub.loading import load_model_and_processor

    small = {**TEXT_TOWERS["bert"], "vocab_size": 20}  # fewer embeddings than the tiny tokenizer's tokens
    config = GranAlignConfig(
        vision_config=VISION_TOWERS["vit"], text_config=small, embed_dim=32, num_regions=3
    )
    GranAlignModel(config).save_pretrained(saved_model)
    with pytest.raises(ValueError, match="the processor files belong to another model"):
        load_model_and_processor(str(saved_model))


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path):
    import errno
    import types

    from granalign.training.checkpoint import TrainerState, find_latest_checkpoint, save_checkpoint

    class Accelerator:
        is_main_process, fail = True, False

        def wait_for_everyone(self):
            pass

        def save_state(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"partial")
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")

    scheduler = types.SimpleNamespace(state_dict=dict)
    accelerator = Accelerator()
    first = save_checkpoint(accelerator, tmp_path, TrainerState(global_step=10), scheduler)
    accelerator.fail = True
    with pytest.raises(
        OSError, match=r"could not write checkpoint .*step-00000020.*No space left on device.*intact"
    ):
        save_checkpoint(accelerator, tmp_path, TrainerState(global_step=20), scheduler)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000010"]
    assert find_latest_checkpoint(tmp_path) == first
