"""Repo-card metadata checks of the test Hub's `POST /api/validate-yaml` (and of README.md commits).

A reasonable subset of the Hub's JSON schema for model and dataset cards: the YAML front matter must
parse to a mapping; known keys must have the right types; `license` and `pipeline_tag` must be known
ids; `base_model` must be repo ids; `model-index` must have the structure the Hub (and Papers with Code)
read. Unknown keys are allowed, as on the Hub.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

LICENSES = frozenset(
    """apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl
    osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr llama2 llama3 gemma unknown other""".split()
)
PIPELINE_TAGS = frozenset(
    """audio-classification automatic-speech-recognition depth-estimation document-question-answering
    feature-extraction fill-mask image-classification image-feature-extraction image-segmentation
    image-text-to-text image-to-image image-to-text mask-generation object-detection question-answering
    sentence-similarity summarization table-question-answering text-classification text-generation
    text-to-image text-to-speech token-classification translation video-classification
    visual-question-answering zero-shot-classification zero-shot-image-classification
    zero-shot-object-detection""".split()
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
YAML_BLOCK = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


def _strings(value: Any, key: str, errors: list[str], *, single_ok: bool = True) -> list[str]:
    values = [value] if single_ok and isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        errors.append(f'"{key}" must be a string or a list of strings, got {value!r}')
        return []
    return values


def _check_model_index(index: Any, errors: list[str]) -> None:
    if not isinstance(index, list) or not index:
        errors.append('"model-index" must be a non-empty list')
        return
    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"{where}.name" must be a string')
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f'"{where}.results" must be a list')
            continue
        for j, result in enumerate(results):
            at = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f'"{at}" must be a mapping')
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f'"{at}.task.type" is required and must be a string')
            if not isinstance(dataset, dict) or not all(
                isinstance(dataset.get(k), str) for k in ("type", "name")
            ):
                errors.append(f'"{at}.dataset" needs string "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{at}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                ok = isinstance(metric, dict) and isinstance(metric.get("type"), str)
                value = metric.get("value") if isinstance(metric, dict) else None
                if not ok or isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    errors.append(f'"{at}.metrics[{k}]" needs a string "type" and a number or string "value"')


def _check_dataset_card(meta: dict[str, Any], errors: list[str]) -> None:
    infos = meta.get("dataset_info")
    for info in [infos] if isinstance(infos, dict) else infos or []:
        if not isinstance(info, dict):
            errors.append('"dataset_info" entries must be mappings')
            continue
        for split in info.get("splits", []) or []:
            if not isinstance(split, dict) or not isinstance(split.get("name"), str):
                errors.append('"dataset_info.splits" entries need a string "name"')
    for config in meta.get("configs", []) or []:
        if not isinstance(config, dict) or not isinstance(config.get("config_name"), str):
            errors.append('"configs" entries need a string "config_name"')
            continue
        files = config.get("data_files")
        entries = files if isinstance(files, list) else [files]
        for entry in entries:
            if not isinstance(entry, (str, dict)) or (isinstance(entry, dict) and "path" not in entry):
                errors.append(f'"configs[{config["config_name"]}].data_files" entries need a "path"')


def validate_card_metadata(content: str, repo_type: str) -> tuple[list[str], list[str]]:
    """`(errors, warnings)` for the README `content` of a repo of `repo_type`."""
    match = YAML_BLOCK.match(content)
    if match is None:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"YAML metadata does not parse: {err}"], []
    if meta is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"], []
    errors: list[str] = []
    licenses = _strings(meta["license"], "license", errors) if "license" in meta else []
    for license_id in licenses:
        if license_id not in LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license ids, got {license_id!r}')
    if "other" in licenses and not ("license_name" in meta and "license_link" in meta):
        errors.append('license "other" needs "license_name" and "license_link"')
    for key in ("tags", "datasets", "language", "metrics"):
        if key in meta:
            _strings(meta[key], key, errors)
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append(f'"library_name" must be a string, got {meta["library_name"]!r}')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a Hub task id, got {meta["pipeline_tag"]!r}')
    for base in _strings(meta["base_model"], "base_model", errors) if "base_model" in meta else []:
        if not REPO_ID.match(base):
            errors.append(f'"base_model" must be Hub repo ids, got {base!r}')
    if "model-index" in meta:
        if repo_type != "model":
            errors.append('"model-index" is only allowed in model cards')
        _check_model_index(meta["model-index"], errors)
    if repo_type == "dataset":
        _check_dataset_card(meta, errors)
    return errors, []
