"""Client sides of tests/test_hub_endpoint.py, run as fresh processes whose `HF_ENDPOINT` is the test Hub.

    python endpoint_clients.py push SPEC_JSON     granalign installed: `push_model_dir` of a pixel and a
                                                  region-feature model
    python endpoint_clients.py direct SPEC_JSON   granalign blocked: pull each repo, build its
                                                  `handler.EndpointHandler(path)` as Endpoints does and call
                                                  it with every payload kind and bad ones, next to what the
                                                  remote-code model and the zero-shot pipeline give

As in `hub_clients.py` (whose helpers are reused), `direct` imports first and waits for the file
`spec["go"]`, only the standard library is imported at the top, and the outcome is one JSON object
printed as the last stdout line.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from typing import Any

from hub_clients import _attempt, _BlockGranalign

CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]
REGION_DIM = 24


def image_b64(seed: int) -> str:
    """A random 40x48 RGB image as base64 PNG (lossless: every process decodes the same pixels)."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def regions(seed: int, count: int = 5) -> list[list[float]]:
    import numpy as np

    return np.random.default_rng(seed).normal(size=(count, REGION_DIM)).astype(np.float32).tolist()


def payloads(region_model: bool) -> dict[str, dict[str, Any]]:
    """Every payload kind for the model, by name (the test asserts on each)."""
    image = {"regions": regions(0)} if region_model else image_b64(0)
    other = {"regions": regions(1, 3)} if region_model else image_b64(1)
    return {
        "zero_shot": {"inputs": image, "parameters": {"candidate_labels": CAPTIONS}},
        "zero_shot_comma_labels": {"inputs": image, "parameters": {"candidate_labels": "two dogs, a small green star"}},
        "zero_shot_template": {"inputs": image, "parameters": {"candidate_labels": CAPTIONS,
                                                               "hypothesis_template": "a photo of {}"}},
        "caption_embedding": {"inputs": CAPTIONS[0]},
        "caption_embeddings": {"inputs": CAPTIONS},
        "image_embedding": {"inputs": image, "parameters": {"task": "image-feature-extraction"}},
        "image_embeddings_inferred": {"inputs": [image, other]},
        "scores": {"inputs": {"image": image, "captions": CAPTIONS}},
        "scores_explicit": {"inputs": {"image": image, "captions": CAPTIONS}, "parameters": {"task": "score"}},
    }  # fmt: skip


def bad_payloads(region_model: bool) -> dict[str, Any]:
    image = {"regions": regions(0)} if region_model else image_b64(0)
    return {
        "no_inputs": {"parameters": {"candidate_labels": CAPTIONS}},
        "not_an_object": ["inputs"],
        "empty_labels": {"inputs": image, "parameters": {"candidate_labels": []}},
        "label_not_a_string": {"inputs": image, "parameters": {"candidate_labels": ["ok", 7]}},
        "zero_shot_without_labels": {"inputs": image, "parameters": {"task": "zero-shot-image-classification"}},
        "unknown_task": {"inputs": CAPTIONS, "parameters": {"task": "translation"}},
        "unknown_parameter": {"inputs": image, "parameters": {"candidate_labels": CAPTIONS, "top_k": 1}},
        "parameters_not_an_object": {"inputs": CAPTIONS, "parameters": ["task"]},
        "bad_base64": {"inputs": "not base64 at all!", "parameters": {"candidate_labels": CAPTIONS}},
        "not_an_image": {"inputs": base64.b64encode(b"just some bytes").decode(),
                         "parameters": {"task": "image-feature-extraction"}},
        "url_is_not_fetched": {"inputs": "https://example.com/cat.png", "parameters": {"candidate_labels": CAPTIONS}},
        "scores_without_captions": {"inputs": {"image": image}},
        "scores_caption_empty": {"inputs": {"image": image, "captions": ["fine", "  "]}},
        "too_many_captions": {"inputs": ["a caption"] * 65},
        "too_many_images": {"inputs": [image] * 17},
        "mixed_inputs": {"inputs": [image_b64(0), "a caption"]},
        "image_for_region_model" if region_model else "regions_for_pixel_model":
            {"inputs": image_b64(0) if region_model else {"regions": regions(0)},
             "parameters": {"task": "image-feature-extraction"}},
    }  # fmt: skip


def push(spec: dict[str, Any]) -> dict[str, Any]:
    from granalign.hub import push_model_dir

    results: dict[str, Any] = {}
    for name in ("pixel", "regions"):

        def scenario(name: str = name) -> dict[str, Any]:
            result = push_model_dir(spec[f"{name}_dir"], spec[f"{name}_repo"], commit_message=f"push {name}")
            return {"files": sorted(result.files), "commit": result.commit_oid}

        _attempt(results, name, scenario)
    return results


def _load_handler(directory: str) -> Any:
    """As the Endpoints toolkit loads a custom handler (`check_and_register_custom_pipeline_from_directory`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "handler.EndpointHandler", os.path.join(directory, "handler.py")
    )
    sys.path.insert(0, directory)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    return module.EndpointHandler(directory)


def _reference(directory: str, region_model: bool) -> dict[str, Any]:
    """What the remote-code model itself (and, for pixel models, the zero-shot pipeline) gives."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    if region_model:
        image_inputs = dict(processor(regions=[regions(0)]))
    else:
        image = Image.open(io.BytesIO(base64.b64decode(image_b64(0))))
        image_inputs = dict(processor(images=[image]))
    image_inputs = {
        k: v for k, v in image_inputs.items() if k in ("pixel_values", "region_features", "region_mask")
    }
    text = processor(text=CAPTIONS, padding="longest")
    text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    with torch.no_grad():
        probabilities = model(**text, **image_inputs).logits_per_image[0].softmax(-1).tolist()
        out = {
            "zero_shot": dict(zip(CAPTIONS, probabilities, strict=True)),
            "caption_embeddings": model.get_text_features(**text).pooler_output.tolist(),
            "image_embedding": model.get_image_features(**image_inputs).pooler_output[0].tolist(),
            "scores": model.score(model.encode_image(**image_inputs), model.encode_text(**text))[0].tolist(),
        }
    if not region_model:
        classifier = pipeline("zero-shot-image-classification", model=directory, trust_remote_code=True)
        ranking = classifier(image, candidate_labels=CAPTIONS, hypothesis_template="{}")
        out["pipeline"] = [{"label": r["label"], "score": float(r["score"])} for r in ranking]
    return out


def direct(spec: dict[str, Any]) -> dict[str, Any]:
    sys.meta_path.insert(0, _BlockGranalign())
    import torch  # noqa: F401  (imported before waiting, like the rest)
    import transformers  # noqa: F401
    from huggingface_hub import snapshot_download

    deadline = time.monotonic() + 300
    while not os.path.exists(spec["go"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"the pushes never finished: {spec['go']} did not appear")
        time.sleep(0.05)
    results: dict[str, Any] = {}
    try:
        import granalign  # noqa: F401

        results["granalign_importable"] = True
    except ImportError:
        results["granalign_importable"] = False

    for name, region_model in (("pixel", False), ("regions", True)):

        def scenario(name: str = name, region_model: bool = region_model) -> dict[str, Any]:
            directory = os.path.join(spec["work_dir"], name)
            snapshot_download(spec[f"{name}_repo"], local_dir=directory)
            handler = _load_handler(directory)
            answers = {key: handler(payload) for key, payload in payloads(region_model).items()}
            errors = {}
            for key, payload in bad_payloads(region_model).items():
                answer = handler(payload)
                errors[key] = answer if isinstance(answer, dict) else {"not_an_error": str(answer)[:200]}
            return {"files": sorted(os.listdir(directory)), "model_module": type(handler.model).__module__,
                    "answers": answers, "errors": errors, "reference": _reference(directory, region_model)}  # fmt: skip

        _attempt(results, name, scenario)
    return results


if __name__ == "__main__":
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    outcome = {"push": push, "direct": direct}[mode](spec)
    print(json.dumps(outcome))
