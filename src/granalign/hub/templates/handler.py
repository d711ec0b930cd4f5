"""Inference Endpoints custom handler for a GranAlign (GRM) model repository.

`granalign push` (and `train --push-to-hub`, `model.push_to_hub`) puts this file in every model repo, with
the `requirements.txt` it needs. Inference Endpoints imports it, builds `EndpointHandler(path)` on the
downloaded repository and calls it with each request's JSON body. It loads the model and its processor
with `trust_remote_code=True` (the repo's `*_granalign.py`), so it runs where `granalign` is not
installed: it imports only the standard library, torch, PIL and transformers.

Payloads (`IMAGE` is a base64-encoded image, optionally as a `data:image/...;base64,` URL; when the
request body is a raw image, Endpoints passes it as a PIL image; a model on precomputed region features
takes `{"regions": [[...], ...]}`, an `[N, D]` list of region features, instead):

* zero-shot labels, the standard zero-shot-image-classification payload:
  `{"inputs": IMAGE, "parameters": {"candidate_labels": ["a dog", "a cat"]}}` (or a comma-separated string)
  -> `[{"label": ..., "score": ...}, ...]`, best first; scores are the softmax of the model's
  `logits_per_image` over the labels. `parameters.hypothesis_template` (default `"{}"`: labels as written)
  turns each label into a caption.
* caption embeddings: `{"inputs": "a caption"}` -> one unit vector of size d; `{"inputs": [captions]}` ->
  one per caption (the global embedding, `get_text_features(...).pooler_output`).
* image embeddings: `{"inputs": IMAGE}` or `{"inputs": [IMAGE, ...]}` -> one vector, or one per image
  (`get_image_features(...).pooler_output`).
* GRM scores of an image against captions: `{"inputs": {"image": IMAGE, "captions": [...]}}` ->
  `[{"caption": ..., "score": ...}, ...]` in the captions' order (`model.score` of `encode_image` and
  `encode_text`: the fine-grained similarity, higher = better match; not a probability).

`parameters.task` names the kind explicitly (`zero-shot-image-classification`, `feature-extraction`,
`image-feature-extraction` or `score`); without it the kind follows from the payload as listed above. A
payload that does not fit gets `{"error": "...", "field": "..."}` naming the offending field, never a
traceback.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

logger = logging.getLogger(__name__)

TASKS = ("zero-shot-image-classification", "feature-extraction", "image-feature-extraction", "score")
PARAMETERS = {
    "zero-shot-image-classification": ("task", "candidate_labels", "hypothesis_template"),
    "feature-extraction": ("task",),
    "image-feature-extraction": ("task",),
    "score": ("task",),
}
MAX_ITEMS = 64  # captions or labels in one request
MAX_IMAGES = 16  # images in one request
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # one decoded image file
MAX_IMAGE_PIXELS = 40_000_000  # one image, width x height (larger ones are refused before decoding)
MAX_CAPTION_CHARS = 2_000


class PayloadError(ValueError):
    """A request that does not fit the payload schema; `field` names the part that is wrong."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class EndpointHandler:
    """Serves zero-shot labels, caption and image embeddings and GRM scores (see the module doc)."""

    def __init__(self, path: str = "") -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModel.from_pretrained(path or ".", trust_remote_code=True).to(self.device).eval()
        try:
            self.processor = AutoProcessor.from_pretrained(path or ".", trust_remote_code=True)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"{path!r} has no loadable GranAlign processor ({error}); push it with "
                "`processor.push_to_hub(repo_id)` or `granalign push`"
            ) from error
        self.uses_regions = getattr(self.processor, "image_processor", None) is None

    # ------------------------------------------------------------------ request
    def __call__(self, data: dict[str, Any]) -> list[Any] | dict[str, Any]:
        try:
            task, inputs, parameters = self._parse(data)
            with torch.inference_mode():
                if task == "zero-shot-image-classification":
                    return self._zero_shot(inputs, parameters)
                if task == "feature-extraction":
                    return self._caption_embeddings(inputs)
                if task == "image-feature-extraction":
                    return self._image_embeddings(inputs)
                return self._scores(inputs)
        except PayloadError as error:
            return {"error": str(error), "field": error.field}
        except Exception as error:  # a bug or a resource problem: logged here, answered without a traceback
            logger.exception("GranAlign endpoint request failed")
            return {"error": f"the model could not answer this request: {type(error).__name__}: {error}",
                    "field": None}  # fmt: skip

    def _parse(self, data: Any) -> tuple[str, Any, dict[str, Any]]:
        if not isinstance(data, dict):
            raise PayloadError(f"the request body must be a JSON object, got {type(data).__name__}", "inputs")
        unknown = sorted(set(data) - {"inputs", "parameters", "options"})  # options: service hints
        if unknown:
            raise PayloadError(f"unknown top-level key {unknown[0]!r}: expected 'inputs' and 'parameters'",
                               unknown[0])  # fmt: skip
        if "inputs" not in data or data["inputs"] is None:
            raise PayloadError("the request has no 'inputs'", "inputs")
        inputs, parameters = data["inputs"], data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise PayloadError(
                f"'parameters' must be an object, got {type(parameters).__name__}", "parameters"
            )
        parameters = dict(parameters)
        if "candidateLabels" in parameters:  # the spelling some clients send, as Endpoints accepts it
            parameters.setdefault("candidate_labels", parameters.pop("candidateLabels"))
        task = parameters.get("task")
        if task is None:
            task, inputs = self._infer_task(inputs, parameters)
        elif task not in TASKS:
            raise PayloadError(
                f"unknown task {task!r}: expected one of {', '.join(TASKS)}", "parameters.task"
            )
        for name in parameters:
            if name not in PARAMETERS[task]:
                allowed = ", ".join(repr(p) for p in PARAMETERS[task])
                raise PayloadError(f"parameter {name!r} does not apply to {task} (it takes {allowed})",
                                   f"parameters.{name}")  # fmt: skip
        return task, inputs, parameters

    def _infer_task(self, inputs: Any, parameters: dict[str, Any]) -> tuple[str, Any]:
        """The task a payload without `parameters.task` asks for, and its inputs (base64 images decoded)."""
        if "candidate_labels" in parameters:
            return "zero-shot-image-classification", inputs
        if isinstance(inputs, dict):
            return ("score" if {"image", "captions"} & set(inputs) else "image-feature-extraction"), inputs
        items = inputs if isinstance(inputs, list) and inputs else [inputs]
        decoded = [_maybe_image(item) for item in items]
        if all(image is not None for image in decoded):
            return "image-feature-extraction", decoded if isinstance(inputs, list) else decoded[0]
        if all(image is None for image in decoded):
            return "feature-extraction", inputs
        raise PayloadError("'inputs' mixes images and captions; send one kind per request", "inputs")

    # ------------------------------------------------------------------ inputs
    def _captions(self, value: Any, field: str, *, single_ok: bool = False) -> list[str]:
        """Captions (or labels) from a list of strings, or one string where `single_ok`."""
        single = single_ok and isinstance(value, str)
        if isinstance(value, str) and field.endswith("candidate_labels"):
            value = [label.strip() for label in value.split(",")]  # "a, b", as the widget writes them
        captions = [value] if single else value
        if not isinstance(captions, list) or not captions:
            raise PayloadError(f"{field} must be a non-empty list of strings", field)
        if len(captions) > MAX_ITEMS:
            raise PayloadError(f"{field} has {len(captions)} entries; at most {MAX_ITEMS} per request", field)
        for index, caption in enumerate(captions):
            where = field if single else f"{field}[{index}]"
            if not isinstance(caption, str) or not caption.strip():
                raise PayloadError(f"{where} must be a non-empty string, got {caption!r}", where)
            if len(caption) > MAX_CAPTION_CHARS:
                raise PayloadError(f"{where} is longer than {MAX_CAPTION_CHARS} characters", where)
        return captions

    def _text_batch(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self.processor(text=captions, padding="longest")
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _image_batch(self, images: list[Any], field: str) -> dict[str, torch.Tensor]:
        if len(images) > MAX_IMAGES:
            raise PayloadError(f"{field} has {len(images)} images; at most {MAX_IMAGES} per request", field)
        fields = [field if len(images) == 1 else f"{field}[{i}]" for i in range(len(images))]
        if self.uses_regions:
            arrays = [_regions(image, where) for image, where in zip(images, fields, strict=True)]
            try:
                batch = self.processor(regions=arrays)
            except (TypeError, ValueError) as error:
                raise PayloadError(f"{field}: {error}", field) from None
            dim = self.model.config.region_feature_dim
            if batch["region_features"].shape[-1] != dim:
                raise PayloadError(f"{field}: region features must have size {dim}, got "
                                   f"{batch['region_features'].shape[-1]}", field)  # fmt: skip
            names = ("region_features", "region_mask")
        else:
            pictures = [_image(image, where) for image, where in zip(images, fields, strict=True)]
            try:
                batch = self.processor(images=pictures)
            except (TypeError, ValueError) as error:
                raise PayloadError(f"{field}: {error}", field) from None
            names = ("pixel_values",)
        return {name: batch[name].to(self.device, dtype=self._dtype(batch[name])) for name in names}

    def _dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.model.dtype if tensor.is_floating_point() else tensor.dtype

    # ------------------------------------------------------------------ tasks
    def _zero_shot(self, inputs: Any, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        if "candidate_labels" not in parameters:
            raise PayloadError("zero-shot classification needs parameters.candidate_labels",
                               "parameters.candidate_labels")  # fmt: skip
        labels = self._captions(parameters["candidate_labels"], "parameters.candidate_labels")
        template = parameters.get("hypothesis_template", "{}")
        if not isinstance(template, str) or "{}" not in template:
            raise PayloadError(f"parameters.hypothesis_template must be a string containing '{{}}', got "
                               f"{template!r}", "parameters.hypothesis_template")  # fmt: skip
        image = self._image_batch([_single(inputs, "inputs")], "inputs")
        logits = self.model(**self._text_batch([template.format(label) for label in labels]), **image)
        probabilities = logits.logits_per_image[0].float().softmax(dim=-1).tolist()
        ranked = sorted(zip(labels, probabilities, strict=True), key=lambda pair: -pair[1])
        return [{"label": label, "score": score} for label, score in ranked]

    def _caption_embeddings(self, inputs: Any) -> list[Any]:
        captions = self._captions(inputs, "inputs", single_ok=True)
        embeddings = self.model.get_text_features(**self._text_batch(captions)).pooler_output
        vectors = embeddings.float().cpu().tolist()
        return vectors[0] if isinstance(inputs, str) else vectors

    def _image_embeddings(self, inputs: Any) -> list[Any]:
        images = inputs if isinstance(inputs, list) else [inputs]
        if not images:
            raise PayloadError("'inputs' is an empty list; send at least one image", "inputs")
        embeddings = self.model.get_image_features(**self._image_batch(images, "inputs")).pooler_output
        vectors = embeddings.float().cpu().tolist()
        return vectors if isinstance(inputs, list) else vectors[0]

    def _scores(self, inputs: Any) -> list[dict[str, Any]]:
        if not isinstance(inputs, dict):
            raise PayloadError('scores need \'inputs\' as {"image": IMAGE, "captions": [...]}', "inputs")
        for key in ("image", "captions"):
            if key not in inputs:
                raise PayloadError(f"scores need inputs.{key}", f"inputs.{key}")
        extra = sorted(set(inputs) - {"image", "captions"})
        if extra:
            raise PayloadError(f"unknown key inputs.{extra[0]}: expected 'image' and 'captions'",
                               f"inputs.{extra[0]}")  # fmt: skip
        captions = self._captions(inputs["captions"], "inputs.captions")
        images = self.model.encode_image(**self._image_batch([inputs["image"]], "inputs.image"))
        texts = self.model.encode_text(**self._text_batch(captions))
        scores = self.model.score(images, texts)[0].float().tolist()
        return [{"caption": caption, "score": score} for caption, score in zip(captions, scores, strict=True)]


def _maybe_image(value: Any) -> Any:
    """`value` as an image when it is one (a PIL image, bytes, region features, a base64 image), else None."""
    if isinstance(value, (Image.Image, bytes, bytearray, dict)):
        return value
    if not isinstance(value, str):
        return None
    if value.startswith("data:image/"):
        return _image(value, "inputs")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:  # text with spaces or punctuation: a caption
        return None
    return _open_image(data, "inputs")


def _single(value: Any, field: str) -> Any:
    if isinstance(value, list):
        if len(value) != 1:
            raise PayloadError(f"{field} must be one image, got a list of {len(value)}", field)
        return value[0]
    return value


def _open_image(data: bytes, field: str) -> Image.Image | None:
    """The image in `data` (checked, loaded), None when it is not an image file."""
    if len(data) > MAX_IMAGE_BYTES:
        raise PayloadError(f"{field} is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB", field)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise PayloadError(f"{field} is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels", field)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise PayloadError(f"{field} is a damaged image: {error}", field) from None
    return image


def _image(value: Any, field: str) -> Image.Image:
    """A PIL image from a base64 string (or `data:` URL), raw bytes, or a PIL image (Endpoints' own
    decoding of an image body). URLs and file paths are refused: the endpoint fetches nothing."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        if text.startswith(("http://", "https://", "/", "file:")):
            raise PayloadError(f"{field} must be a base64-encoded image; URLs and paths are not fetched",
                               field)  # fmt: skip
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PayloadError(f"{field} is not valid base64 (send the image file's bytes, base64-encoded)",
                               field) from None  # fmt: skip
    elif isinstance(value, dict):
        raise PayloadError(f"{field}: this model takes images, not region features", field)
    else:
        raise PayloadError(f"{field} must be a base64-encoded image, got {type(value).__name__}", field)
    image = _open_image(data, field)
    if image is None:
        raise PayloadError(f"{field} is not an image file PIL can read (PNG, JPEG, WebP, ...)", field)
    return image


def _regions(value: Any, field: str) -> list[list[float]]:
    """The `[N, D]` region features of `{"regions": [[...], ...]}` (models on precomputed regions)."""
    if not isinstance(value, dict) or "regions" not in value:
        raise PayloadError(f"{field}: this model takes precomputed region features, not images: send "
                           '{"regions": [[...], ...]} (an [N, D] list)', field)  # fmt: skip
    regions = value["regions"]
    if not isinstance(regions, list) or not regions or not all(isinstance(row, list) for row in regions):
        raise PayloadError(f"{field}.regions must be a non-empty [N, D] list of lists of numbers",
                           f"{field}.regions")  # fmt: skip
    return regions
