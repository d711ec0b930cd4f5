"""`granalign export-onnx`: the two encoders of tiny random models as ONNX files, run with onnxruntime and
compared with PyTorch (at batch sizes, caption lengths and region counts other than the export's), and a
gallery encoded from the exported folder in a process where torch cannot be imported.

Skipped, with the reason, when onnxruntime or onnxscript (the `onnx` extra) is missing; CI installs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import IMAGE_SIZE, REGION_DIM, image_inputs, text_inputs, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.cli import main

pytestmark = pytest.mark.slow  # four exports: about 10 s each on two CPU cores
ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'granalign[onnx]')"
)
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'granalign[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'granalign[onnx]')")

from granalign.export_onnx import IMAGE_FILE, ONNX_CONFIG, TEXT_FILE, export_onnx  # noqa: E402

ATOL = 1e-5  # float32 unit vectors: what onnxruntime and PyTorch agree to on CPU
CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]
# encode a gallery from the exported folder alone: transformers' processors and onnxruntime, torch blocked
_TORCH_FREE = """
import importlib.util, json, sys
class BlockTorch:  # as if torch were not installed: not found, and not importable
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("torch is blocked in this process", name=name)
sys.meta_path.insert(0, BlockTorch())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torch" else _find_spec(name, package)
import numpy as np, onnxruntime
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
directory, captions = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(f"{directory}/granalign_onnx.json"))
images = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for s in range(3)]
pixels = AutoImageProcessor.from_pretrained(directory)(images, return_tensors="np")["pixel_values"]
tokens = AutoTokenizer.from_pretrained(directory)(captions, padding=True, truncation=True,
                                                  max_length=config["max_length"], return_tensors="np")
image = onnxruntime.InferenceSession(f"{directory}/encode_image.onnx", providers=["CPUExecutionProvider"])
text = onnxruntime.InferenceSession(f"{directory}/encode_text.onnx", providers=["CPUExecutionProvider"])
out = {"image": image.run(None, {"pixel_values": pixels})[0].tolist(),
       "text": text.run(None, {"input_ids": tokens["input_ids"].astype(np.int64),
                               "attention_mask": tokens["attention_mask"].astype(np.int64)})[0].tolist(),
       "torch_imported": "torch" in sys.modules}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-model")
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(image_processor, tiny_tokenizer(root), max_length=16)
    model = tiny_model("vit").eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", model, processor


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """`granalign export-onnx MODEL --output DIR`, as a user runs it."""
    output = tmp_path_factory.mktemp("onnx") / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        status = main(["export-onnx", str(saved[0]), "--output", str(output)])
    return status, printed.getvalue(), output


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_the_command_writes_both_encoders_checked_against_pytorch(exported, record_property):
    status, printed, output = exported
    assert status == 0, printed
    config = json.loads((output / ONNX_CONFIG).read_text())
    assert config["encoders"]["image"]["outputs"] == ["image_embeds"]
    assert config["encoders"]["text"]["outputs"] == ["text_embeds"]
    assert config["encoders"]["image"]["inputs"] == {"pixel_values": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert config["encoders"]["text"]["inputs"] == {"input_ids": ["batch", "length"],
                                                    "attention_mask": ["batch", "length"]}  # fmt: skip
    assert config["embed_dim"] == 32 and config["max_length"] == 16 and config["fine_grained"] is False
    worst = max(d for kind in config["max_abs_diff"].values() for d in kind.values())
    assert worst < ATOL
    record_property("onnx_max_abs_diff_in_command", worst)
    assert f"{IMAGE_FILE}: pixel_values -> image_embeds (onnxruntime vs PyTorch: max abs diff" in printed
    assert (output / "processor_config.json").is_file() and (output / "tokenizer.json").is_file()
    # the graphs' axes: batch and caption length are named (dynamic), the image size is fixed
    image, text = onnx.load(output / IMAGE_FILE), onnx.load(output / TEXT_FILE)
    assert _dims(image.graph.input[0]) == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert _dims(image.graph.output[0])[1] == 32 and isinstance(_dims(image.graph.output[0])[0], str)
    assert [_dims(i) for i in text.graph.input] == [["batch", "length"], ["batch", "length"]]


def test_onnxruntime_matches_get_image_and_text_features(saved, exported, record_property):
    _, model, _ = saved
    output = exported[2]
    image = ort.InferenceSession(str(output / IMAGE_FILE), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(output / TEXT_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((1, 5), (5, 13), (7, 30)):
        pixels = image_inputs("vit", batch, seed=batch)["pixel_values"]
        captions = text_inputs(batch, length=length, seed=batch)  # padded rows of several lengths
        with torch.no_grad():
            images = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
            texts = model.get_text_features(**captions).pooler_output.numpy()
        got_images = image.run(None, {"pixel_values": pixels.numpy()})[0]
        got_texts = text.run(None, {k: v.numpy() for k, v in captions.items()})[0]
        assert got_images.shape == images.shape and got_texts.shape == texts.shape
        worst = max(worst, float(np.abs(got_images - images).max()), float(np.abs(got_texts - texts).max()))
        np.testing.assert_allclose(np.linalg.norm(got_images, axis=-1), 1.0, atol=1e-5)
    assert worst < ATOL
    record_property("onnx_max_abs_diff", worst)


def test_a_gallery_is_encoded_from_the_folder_without_torch(saved, exported):
    _, model, processor = saved
    output = exported[2]
    done = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(output), json.dumps(CAPTIONS)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["torch_imported"] is False
    images = [
        Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 48, 3), dtype=np.uint8))
        for s in range(3)
    ]
    batch = processor(images=images, text=CAPTIONS, padding="longest")
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        expected_texts = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    np.testing.assert_allclose(np.array(got["image"]), expected_images.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.array(got["text"]), expected_texts.numpy(), atol=ATOL)


def test_fine_grained_export_of_a_region_model(tmp_path):
    """Region features in, and every multi-vector part model.score uses out, with dynamic region counts."""
    model = tiny_model(None).eval()
    processor = GranAlignProcessor(image_processor=None, tokenizer=tiny_tokenizer(tmp_path), max_length=16)
    config = export_onnx(model, processor, tmp_path / "out", fine_grained=True, atol=ATOL)
    image_outputs = config["encoders"]["image"]["outputs"]
    assert image_outputs[0] == "image_embeds"
    assert {"tokens", "keep_weights", "region_tokens", "region_logvars", "mixture_weights"} <= set(
        image_outputs
    )
    assert "spatial_mask" not in image_outputs  # the region_mask input itself
    assert config["encoders"]["text"]["outputs"] == ["text_embeds", "tokens", "keep_weights"]
    assert config["encoders"]["image"]["inputs"] == {"region_features": ["batch", "regions", REGION_DIM],
                                                     "region_mask": ["batch", "regions"]}  # fmt: skip
    assert max(d for kind in config["max_abs_diff"].values() for d in kind.values()) < ATOL
    session = ort.InferenceSession(str(tmp_path / "out" / IMAGE_FILE), providers=["CPUExecutionProvider"])
    regions = image_inputs(None, 3, seed=4, num_regions=9)
    got = dict(zip(image_outputs, session.run(None, {k: v.numpy() for k, v in regions.items()}), strict=True))
    with torch.no_grad():
        expected = model.encode_image(**regions)
    for name in image_outputs:
        np.testing.assert_allclose(got[name], expected[name].numpy(), atol=ATOL, err_msg=name)


def test_a_missing_onnxruntime_is_one_line_naming_the_extra(saved, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    assert main(["export-onnx", str(saved[0]), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "granalign export-onnx: error: export-onnx needs onnxruntime: "
        "pip install 'granalign[onnx]' (onnx, onnxruntime, onnxscript)"
    )
    assert not (tmp_path / "out").exists()
