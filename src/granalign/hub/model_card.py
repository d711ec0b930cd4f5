"""The model card of a pushed GranAlign model, rendered with `huggingface_hub.ModelCard` from the template
shipped in `granalign/hub/templates/`.

The YAML metadata carries `library_name: transformers`, the license, tags, datasets, `pipeline_tag:
zero-shot-image-classification`, `widget:` examples in the payloads the repo's Inference Endpoints handler
accepts (an image with candidate labels; a caption), the towers' `base_model` where they are Hub ids, and
a `model-index` with R@1/5/10 both ways and rSum per dataset and protocol. The body has a usage snippet
that runs as written against the pushed repo, the endpoint's payloads with an HTTP snippet that runs
against a deployed endpoint, the training recipe, the method, honest limitations and the BibTeX citation.

Example:
    >>> card = build_model_card("runs/tiny/final", "me/granalign-tiny", eval_results="metrics.json")
    >>> validate_model_card(card); card.save("README.md")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .eval_results import (
    METRIC_NAMES,
    EvalSource,
    RetrievalResult,
    load_eval_results,
    resolve_dataset,
    to_eval_results,
)
from .model_dir import count_safetensors_parameters, load_recipe_dict, read_json

__all__ = [
    "ENDPOINT_URL_PLACEHOLDER",
    "GRM_CITATION",
    "TEMPLATE_PATH",
    "build_model_card",
    "endpoint_snippet",
    "extract_endpoint_snippet",
    "extract_usage_snippet",
    "usage_snippet",
    "validate_model_card",
]

TEMPLATE_PATH = Path(__file__).with_name("templates") / "modelcard_template.md"
PIPELINE_TAG = "zero-shot-image-classification"
DEFAULT_TAGS = ("granalign", "grm", "image-text-retrieval", "cross-modal-retrieval", "custom_code")
GRM_CITATION = """@inproceedings{liu2026grm,
  title         = {Cross Modal Fine-Grained Alignment via Granularity-Aware and Region-Uncertain Modeling},
  author        = {Liu, Jiale and Zhou, Haoming and Liu, Yishu and Chen, Bingzhi and Jiang, Yuncheng},
  booktitle     = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year          = {2026},
  eprint        = {2511.07710},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SNIPPET = re.compile(r"^## How to use\s*?\n.*?^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_ENDPOINT_SNIPPET = re.compile(
    r"^## Inference Endpoints\s*?\n.*?^```python\n(.*?)^```", re.DOTALL | re.MULTILINE
)
ENDPOINT_URL_PLACEHOLDER = "https://YOUR-ENDPOINT.endpoints.huggingface.cloud"
EXAMPLE_CAPTIONS = ("a red circle left of a blue square", "a small green star", "two yellow triangles")
# the Hub's own widget sample image (as on CLIP model cards); the widget sends it base64-encoded with the
# labels as `parameters.candidate_labels`, the zero-shot payload handler.py takes
WIDGET_IMAGE = "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png"


def usage_snippet(repo_id: str, *, revision: str | None = None, region_feature_dim: int | None = None) -> str:
    """Python that loads `repo_id` (at `revision`) with the Auto classes and scores captions against inputs."""
    rev = "" if revision in (None, "main") else f", revision={revision!r}"
    lines = [
        "import torch",
        *(["from PIL import Image"] if region_feature_dim is None else []),
        "from transformers import AutoModel, AutoProcessor",
        "",
        f"repo_id = {repo_id!r}",
        f"model = AutoModel.from_pretrained(repo_id{rev}, trust_remote_code=True).eval()",
        f"processor = AutoProcessor.from_pretrained(repo_id{rev}, trust_remote_code=True)",
        "",
        'captions = ["a red circle left of a blue square", "a small green star", "two yellow triangles"]',
    ]
    if region_feature_dim is None:
        lines += [
            "# stand-ins for your own images (PIL images, numpy arrays or tensors)",
            'images = [Image.new("RGB", (224, 224), "red"), Image.new("RGB", (224, 224), "blue")]',
            'inputs = processor(text=captions, images=images, padding="longest")',
        ]
    else:
        lines += [
            f"# stand-ins for detector region features: one [num_regions, {region_feature_dim}] tensor per image",
            f"regions = [torch.randn(36, {region_feature_dim}), torch.randn(20, {region_feature_dim})]",
            'inputs = processor(text=captions, regions=regions, padding="longest")',
        ]
    lines += [
        "with torch.no_grad():",
        "    scores = model(**inputs).logits_per_image  # [num_images, num_captions], higher = better match",
        "best = scores.argmax(dim=1).tolist()",
        'print("best caption per image:", [captions[i] for i in best])',
    ]
    return "\n".join(lines)


def endpoint_snippet(*, region_feature_dim: int | None = None) -> str:
    """Python that calls a deployed Inference Endpoint of the model over HTTP with each payload kind of
    the repo's `handler.py` (zero-shot labels, caption and image embeddings, GRM scores)."""
    captions = ", ".join(f'"{c}"' for c in EXAMPLE_CAPTIONS)
    lines = [
        *(["import base64", "import io"] if region_feature_dim is None else []),
        "import os",
        *(["import random"] if region_feature_dim is not None else []),
        "",
        "import requests",
        *(["from PIL import Image"] if region_feature_dim is None else []),
        "",
        f'ENDPOINT_URL = "{ENDPOINT_URL_PLACEHOLDER}"  # your endpoint\'s URL',
        'HEADERS = {"Authorization": f"Bearer {os.environ[\'HF_TOKEN\']}"}  # a token that may call it',
        "",
        "",
        "def query(payload):",
        "    response = requests.post(ENDPOINT_URL, headers=HEADERS, json=payload, timeout=60)",
        "    response.raise_for_status()",
        "    answer = response.json()",
        '    if isinstance(answer, dict) and "error" in answer:  # a payload the handler refuses',
        "        raise ValueError(f\"{answer['field']}: {answer['error']}\")",
        "    return answer",
        "",
        "",
    ]
    if region_feature_dim is None:
        lines += [
            'def b64_image(image):  # or: base64.b64encode(open("photo.jpg", "rb").read()).decode()',
            "    buffer = io.BytesIO()",
            '    image.save(buffer, format="PNG")',
            "    return base64.b64encode(buffer.getvalue()).decode()",
            "",
            "",
            'image = b64_image(Image.new("RGB", (224, 224), "red"))  # a stand-in for your own image',
        ]
    else:
        lines += [
            f"# a stand-in for one image's detector region features: an [N, {region_feature_dim}] list",
            f'image = {{"regions": [[random.gauss(0, 1) for _ in range({region_feature_dim})] for _ in range(36)]}}',
        ]
    lines += [
        f"captions = [{captions}]",
        "# zero-shot labels (the zero-shot-image-classification payload): best first, scores sum to 1",
        'labels = query({"inputs": image, "parameters": {"candidate_labels": captions}})',
        'print("best label:", labels[0]["label"], round(labels[0]["score"], 3))',
        "# global embeddings (unit vectors): one per caption, and the image's",
        'caption_vectors = query({"inputs": captions})',
        'image_vector = query({"inputs": image, "parameters": {"task": "image-feature-extraction"}})',
        'print("cosines:", [round(sum(a * b for a, b in zip(image_vector, v)), 3) for v in caption_vectors])',
        "# fine-grained GRM scores of the image against each caption, in the captions' order",
        'for row in query({"inputs": {"image": image, "captions": captions}}):',
        "    print(f\"{row['score']:.3f}  {row['caption']}\")",
    ]
    return "\n".join(lines)


def _widget(region_feature_dim: int | None) -> list[dict[str, str]]:
    """The Hub widget's examples, in payloads `handler.py` takes: an image with candidate labels (the
    zero-shot payload; not for region-feature models, whose inputs no widget can send) and a caption
    (the feature-extraction payload: its embedding)."""
    caption = {"text": EXAMPLE_CAPTIONS[0], "example_title": "Caption embedding"}
    if region_feature_dim is not None:
        return [caption]
    labels = {"src": WIDGET_IMAGE, "candidate_labels": "playing music, playing sports",
              "example_title": "Cat & Dog"}  # fmt: skip
    return [labels, caption]


def _snippet(pattern: re.Pattern[str], heading: str, card_text: str | ModelCard) -> str:
    match = pattern.search(str(card_text))
    if match is None:
        raise ValueError(f"the model card has no ```python block under '## {heading}'")
    return match.group(1)


def extract_usage_snippet(card_text: str | ModelCard) -> str:
    """The Python code block under the card's "## How to use" heading."""
    return _snippet(_SNIPPET, "How to use", card_text)


def extract_endpoint_snippet(card_text: str | ModelCard) -> str:
    """The Python code block (the HTTP call of a deployed endpoint) under "## Inference Endpoints"."""
    return _snippet(_ENDPOINT_SNIPPET, "Inference Endpoints", card_text)


def _looks_like_hub_id(value: Any) -> bool:
    text = str(value or "")
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists() and not text.startswith(".")


def _base_models(config: Mapping[str, Any], recipe: Mapping[str, Any] | None) -> list[str]:
    """Pretrained tower ids: from the recipe's `model.*_pretrained`, else the sub-configs' `_name_or_path`."""
    model = (recipe or {}).get("model") or {}
    found = []
    for side in ("vision", "text"):
        candidate = model.get(f"{side}_pretrained") or (config.get(f"{side}_config") or {}).get(
            "_name_or_path"
        )
        if _looks_like_hub_id(candidate) and candidate not in found:
            found.append(str(candidate))
    return found


def _results_table(results: Sequence[RetrievalResult]) -> str:
    header = "| Dataset | Split | Protocol | " + " | ".join(METRIC_NAMES.values()) + " |"
    rows = [header, "|" + "---|" * (3 + len(METRIC_NAMES))]
    for r in results:
        cells = [r.dataset.name, r.split, r.protocol, *(f"{r.metrics[k]:.2f}" for k in METRIC_NAMES)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _recipe_summary(recipe: Mapping[str, Any]) -> str:
    """Bullet points on the data, towers, optimisation and augmentation sections a recipe dict has."""
    data, model = recipe.get("data"), recipe.get("model")
    optim, train, aug = recipe.get("optim"), recipe.get("train"), recipe.get("augment")
    items = []
    if data:
        builtin = " (the built-in synthetic scenes)" if data.get("source") == "builtin" else ""
        items.append(
            f"Data: `{data.get('source')}`{builtin}; trained on split `{data.get('train_split')}`, checkpoint "
            f"selected on `{data.get('eval_split')}` by dev rSum, tested on `{data.get('test_split')}`."
        )
    if model:
        vision = model.get("vision_pretrained") or (model.get("vision_config") or {}).get("model_type")
        text = model.get("text_pretrained") or (model.get("text_config") or {}).get("model_type")
        items.append(
            f"Towers: vision `{vision or 'precomputed regions'}`, text `{text}`; captions up to "
            f"{model.get('max_length')} tokens."
        )
    if optim or train:
        optim, train = optim or {}, train or {}
        items.append(
            f"Optimisation: AdamW, lr {optim.get('lr')} (towers x{optim.get('backbone_lr_multiplier')}), "
            f"weight decay {optim.get('weight_decay')}, {optim.get('schedule')} schedule; {train.get('epochs')} "
            f"epochs, batch {train.get('batch_size')} per process, gradient clip {train.get('grad_clip')}, "
            f"precision {train.get('mixed_precision')}."
        )
    if aug:
        items.append(
            f"Augmentation: random resized crop scale {aug.get('image_crop_scale')}, horizontal flip "
            f"p={aug.get('horizontal_flip_prob')}, caption word corruption p={aug.get('caption_word_prob')}."
        )
    return (
        "\n".join(f"- {item}" for item in items)
        or "- (the recipe names no data, model or optimiser settings)"
    )


def _tower_text(config: Mapping[str, Any], side: str) -> str:
    sub = config.get(f"{side}_config")
    if not sub:
        return f"precomputed region features of size {config.get('region_feature_dim')}"
    return (
        f"`{sub.get('model_type')}` tower, hidden size {sub.get('hidden_size', sub.get('hidden_sizes', '?'))}"
    )


def _limitations(source: str | None, has_results: bool) -> list[str]:
    lines = []
    if source == "builtin":
        lines.append(
            "It was trained on granalign's built-in synthetic scenes (coloured shapes on plain backgrounds): "
            "it is a demonstration model and does not transfer to natural photos or free-form captions."
        )
    if not has_results:
        lines.append("No evaluation results were supplied, so its retrieval quality is not measured here.")
    return lines


def build_model_card(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    eval_results: EvalSource
    | Sequence[EvalSource]
    | str
    | os.PathLike[str]
    | Mapping[str, Any]
    | None = None,
    recipe: Any = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    base_models: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    revision: str | None = None,
    processor_config: Mapping[str, Any] | None = None,
    num_parameters: int | None = None,
) -> ModelCard:
    """Render the card of the saved model in `model_dir` as it will be pushed to `repo_id` (at `revision`).

    `recipe` defaults to `model_dir/granalign_recipe.yaml`; evaluation results whose dataset is not named
    default to the recipe's data source. `datasets` (training datasets on the Hub) and `base_models`
    default to what the recipe and config say. `processor_config` (the saved processor's config, for the
    caption length) defaults to `model_dir/processor_config.json`, `num_parameters` to the count in the
    directory's safetensors headers.
    """
    directory = Path(model_dir)
    config = read_json(directory / "config.json")
    recipe_dict = load_recipe_dict(directory, recipe)
    source = ((recipe_dict or {}).get("data") or {}).get("source")
    results = load_eval_results(eval_results, default_dataset=source)
    if datasets is None:
        datasets = [resolve_dataset(source).type] if source and resolve_dataset(source).on_hub else []
    bases = list(base_models) if base_models is not None else _base_models(config, recipe_dict)
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        datasets=list(datasets) or None,
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        metrics=["recall"] if results else None,
        model_name=model_name if results else None,  # the model-index name; no results, no index
        eval_results=to_eval_results(results) or None,
        widget=_widget(config.get("region_feature_dim")),
    )
    processor_file = directory / "processor_config.json"
    if processor_config is None:
        processor_config = read_json(processor_file) if processor_file.is_file() else {}
    processor = processor_config
    model_recipe = (recipe_dict or {}).get("model") or {}
    parameters = num_parameters if num_parameters is not None else count_safetensors_parameters(directory)
    links = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases)
    fields = {
        "model_name": model_name,
        "image_side": _tower_text(config, "vision"),
        "text_side": _tower_text(config, "text"),
        "embed_dim": config.get("embed_dim"),
        "num_regions": config.get("num_regions"),
        "level_weights": ", ".join(str(w) for w in config.get("level_weights", [])),
        "num_parameters": f"{parameters / 1e6:.2f} M" if parameters else "unknown",
        "base_models_text": links or "none (towers trained from scratch or loaded from local files)",
        "license": license,
        "usage_snippet": usage_snippet(
            repo_id, revision=revision, region_feature_dim=config.get("region_feature_dim")
        ),
        "endpoint_snippet": endpoint_snippet(region_feature_dim=config.get("region_feature_dim")),
        "uses_regions": config.get("region_feature_dim") is not None,
        "region_feature_dim": config.get("region_feature_dim"),
        "results_table": _results_table(results) if results else "",
        "recipe_summary": _recipe_summary(recipe_dict) if recipe_dict else "",
        "recipe_yaml": yaml.safe_dump(recipe_dict, sort_keys=False).strip() if recipe_dict else "",
        "extra_limitations": _limitations(source, bool(results)),
        "max_length": processor.get("max_length")
        or model_recipe.get("max_length")
        or "the processor's maximum",
        "citation": GRM_CITATION,
    }
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **fields)


def validate_model_card(card: ModelCard | str) -> ModelCard:
    """Check a card locally (no network): the metadata parses with `ModelCard` (including `model-index`),
    carries the keys this package promises, and the usage snippet compiles. Returns the parsed card."""
    parsed = ModelCard(str(card), ignore_metadata_errors=False)
    data = parsed.data
    problems = []
    if data.library_name != "transformers":
        problems.append(f"library_name must be 'transformers', got {data.library_name!r}")
    if data.pipeline_tag != PIPELINE_TAG:
        problems.append(f"pipeline_tag must be {PIPELINE_TAG!r}, got {data.pipeline_tag!r}")
    if not isinstance(data.license, str) or not data.license:
        problems.append(f"license must be a non-empty string, got {data.license!r}")
    for result in data.eval_results or []:
        if isinstance(result.metric_value, bool) or not isinstance(result.metric_value, (int, float)):
            problems.append(f"metric {result.metric_type!r} has a non-numeric value {result.metric_value!r}")
    for name, extract in (("usage", extract_usage_snippet), ("endpoint", extract_endpoint_snippet)):
        try:
            compile(extract(parsed.text), f"<model card {name} snippet>", "exec")
        except (ValueError, SyntaxError) as err:
            problems.append(f"{name} snippet: {err}")
    problems += _widget_problems(getattr(data, "widget", None))
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    return parsed


def _widget_problems(widget: Any) -> list[str]:
    """What is wrong with the card's `widget:` examples: each must be a payload `handler.py` takes, a
    caption (`text`) or an image `src` URL with comma-separated `candidate_labels`."""
    if widget is None:
        return ["widget: the card has no widget examples"]
    if not isinstance(widget, list) or not widget:
        return [f"widget must be a non-empty list, got {widget!r}"]
    problems = []
    for index, example in enumerate(widget):
        if not isinstance(example, Mapping):
            problems.append(f"widget[{index}] must be a mapping, got {example!r}")
        elif "text" in example:
            if not isinstance(example["text"], str) or not example["text"].strip():
                problems.append(f"widget[{index}].text must be a non-empty caption")
        elif "src" in example:
            labels = example.get("candidate_labels")
            if not str(example["src"]).startswith("https://"):
                problems.append(f"widget[{index}].src must be an https URL, got {example['src']!r}")
            if not isinstance(labels, str) or not all(label.strip() for label in labels.split(",")):
                problems.append(
                    f"widget[{index}].candidate_labels must be comma-separated labels, got {labels!r}"
                )
        else:
            problems.append(
                f"widget[{index}] needs `text` (a caption) or `src` (an image) with candidate_labels"
            )
    return problems
