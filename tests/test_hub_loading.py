"""Hub-style loading: Auto classes on import, and remote code where `granalign` cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import IMAGE_SIZE, image_inputs, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoProcessor, ViTImageProcessorPil, pipeline

from granalign import GranAlignConfig, GranAlignModel, GranAlignProcessor

CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]


@pytest.fixture(scope="module")
def saved_vit_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("granalign-vit")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=16)
    model = tiny_model("vit").eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_import_registers_the_auto_classes(saved_vit_model):
    directory = saved_vit_model[0]
    assert isinstance(AutoConfig.from_pretrained(directory), GranAlignConfig)
    assert isinstance(AutoModel.from_pretrained(directory), GranAlignModel)
    assert isinstance(AutoProcessor.from_pretrained(directory), GranAlignProcessor)


def test_saved_model_carries_its_code_and_auto_map(saved_vit_model):
    directory, _, _ = saved_vit_model
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_granalign.GranAlignConfig",
        "AutoModel": "modeling_granalign.GranAlignModel",
        "AutoModelForZeroShotImageClassification": "modeling_granalign.GranAlignModel",
    }
    for name in ("configuration", "modeling", "processing", "layers", "losses", "outputs", "scoring"):
        assert (directory / f"{name}_granalign.py").exists(), name


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from PIL import Image

    class BlockGranalign:
        def find_spec(self, name, path=None, target=None):
            if name == "granalign" or name.startswith("granalign."):
                raise ImportError("granalign is blocked in this process")

    sys.meta_path.insert(0, BlockGranalign())
    from transformers import AutoModel, AutoProcessor, pipeline

    directory, captions = sys.argv[1], json.loads(sys.argv[2])
    try:
        import granalign  # noqa: F401
        raise SystemExit("granalign should not be importable here")
    except ImportError:
        pass
    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    assert not type(model).__module__.startswith("granalign"), type(model).__module__
    images = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 48, 3), dtype=np.uint8))
              for s in range(2)]
    inputs = processor(text=captions, images=images, padding="max_length")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    classifier = pipeline("zero-shot-image-classification", model=directory, trust_remote_code=True)
    ranking = classifier(images[0], candidate_labels=captions)
    print(json.dumps({"scores": scores.tolist(), "labels": [r["label"] for r in ranking]}))
    """
)


def test_remote_code_loads_without_the_package_and_scores_the_same(saved_vit_model, tmp_path):
    directory, model, processor = saved_vit_model
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_SCRIPT, str(directory), json.dumps(CAPTIONS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    inputs = processor(text=CAPTIONS, images=[_image(0), _image(1)], padding="max_length")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.testing.assert_close(torch.tensor(remote["scores"]), expected, rtol=1e-5, atol=1e-5)
    assert sorted(remote["labels"]) == sorted(CAPTIONS)


def test_zero_shot_pipeline_ranks_labels_by_the_model_score(saved_vit_model):
    directory, model, processor = saved_vit_model
    classifier = pipeline("zero-shot-image-classification", model=str(directory))
    template = "{}"
    ranking = classifier(_image(3), candidate_labels=CAPTIONS, hypothesis_template=template)
    inputs = processor(text=CAPTIONS, images=_image(3), padding="longest")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image[0]
    assert [r["label"] for r in ranking] == [CAPTIONS[i] for i in scores.argsort(descending=True)]
    assert sum(r["score"] for r in ranking) == pytest.approx(1.0)


def test_region_feature_model_round_trips_with_a_tokenizer_only_processor(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    GranAlignProcessor(tokenizer=tokenizer, max_length=12).save_pretrained(tmp_path / "m")
    model = tiny_model(None).eval()
    model.save_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    regions = image_inputs(None, batch=2)
    features = [regions["region_features"][i][regions["region_mask"][i].bool()] for i in range(2)]
    inputs = processor(text=CAPTIONS, regions=features)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)
    assert inputs["input_ids"].shape[1] == 12 and "pixel_values" not in inputs
