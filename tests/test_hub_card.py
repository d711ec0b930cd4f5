"""The model card, the evaluation-JSON reader and the push pre-flight checks, offline (no server needed);
the Hub's metadata checks of `tests/hub_card_schema.py` are applied as the test server applies them."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil

import pytest
import torch
import yaml
from hub_card_schema import validate_card_metadata
from huggingface_hub import ModelCard
from tiny_configs import REGION_DIM, tiny_model, tiny_tokenizer

from granalign import GranAlignProcessor
from granalign.evaluation.protocols import evaluate_protocol, evaluate_protocols, save_metrics_json
from granalign.hub import (
    EvalSource,
    PushError,
    build_model_card,
    check_repo_id,
    collect_model_files,
    extract_usage_snippet,
    load_eval_results,
    validate_model_card,
)
from granalign.hub.cli_push import (
    add_push_parser,
    add_train_push_arguments,
    push_callback_from_args,
    run_push,
)
from granalign.hub.eval_results import resolve_dataset

TEXT_TO_IMAGE = [i // 5 for i in range(50)]
REPORTED = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@pytest.fixture(scope="module")
def region_model_dir(tmp_path_factory):
    """A tiny precomputed-region model with a tokenizer-only processor (the fastest model to save)."""
    directory = tmp_path_factory.mktemp("card") / "model"
    tiny_model(None).save_pretrained(directory)
    GranAlignProcessor(tokenizer=tiny_tokenizer(directory.parent), max_length=12).save_pretrained(directory)
    return directory


def _scores(seed: int = 0) -> torch.Tensor:
    return torch.randn(10, 50, generator=torch.Generator().manual_seed(seed))


def _meta(card) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def test_card_metadata_and_model_index_come_from_the_config_recipe_and_evaluation_json(
    region_model_dir, tmp_path
):
    results = evaluate_protocols(_scores(), TEXT_TO_IMAGE, ["all"])
    save_metrics_json(results, tmp_path / "eval.json")
    recipe = {"data": {"source": "nlphuji/flickr30k"}, "model": {"text_pretrained": "google-bert/bert-base-uncased",
              "vision_pretrained": str(tmp_path)}, "train": {"epochs": 3}}  # fmt: skip
    card = build_model_card(
        region_model_dir, "me/grm-regions", eval_results=tmp_path / "eval.json", recipe=recipe
    )
    meta = _meta(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and "granalign" in meta["tags"]
    assert meta["base_model"] == "google-bert/bert-base-uncased"  # a local vision path is not a Hub id
    assert meta["datasets"] == ["nlphuji/flickr30k"]
    [index] = meta["model-index"]
    [entry] = index["results"]
    assert index["name"] == "grm-regions" and entry["dataset"]["type"] == "nlphuji/flickr30k"
    expected = results["all"]["metrics"]
    assert {m["type"]: m["value"] for m in entry["metrics"]} == {
        k: round(expected[k], 2)
        for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    }
    assert validate_card_metadata(str(card), "model") == ([], [])  # what the test Hub's validate-yaml says
    assert ModelCard(str(validate_model_card(card))).data.eval_results[0].metric_value == round(
        expected["i2t_r1"], 2
    )
    text = str(card)
    assert "eprint        = {2511.07710}" in text and "Granularity-Aware and Region-Uncertain" in text
    assert "epochs: 3" in text and "## Limitations" in text and "{{" not in text


def test_region_model_snippet_runs_as_written_on_the_saved_model(region_model_dir):
    card = build_model_card(region_model_dir, "me/grm-regions")
    snippet = extract_usage_snippet(card)
    assert f"torch.randn(36, {REGION_DIM})" in snippet and "Image" not in snippet
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the same code, pointed at the local copy of the repo
        exec(snippet.replace("'me/grm-regions'", repr(str(region_model_dir))), {})
    assert out.getvalue().startswith("best caption per image:")
    assert "No evaluation results were supplied" in str(card) and "model-index" not in _meta(card)


def test_every_evaluation_json_shape_is_read_and_coco_protocols_stay_apart(tmp_path):
    coco = evaluate_protocols(torch.randn(10, 50), TEXT_TO_IMAGE, ["coco-1k", "coco-5k"], check_size=False)
    results = load_eval_results(coco)
    assert [(r.dataset.type, r.protocol) for r in results] == [("yerevann/coco-karpathy", "coco-1k"),
                                                               ("yerevann/coco-karpathy", "coco-5k")]  # fmt: skip
    summary = {
        "best_dev_rsum": 1.0,
        "dev_history": [],
        "test": evaluate_protocol(_scores(), TEXT_TO_IMAGE, "all"),
    }
    [from_summary] = load_eval_results(EvalSource(summary, dataset="builtin"))
    assert from_summary.dataset.name.startswith("granalign built-in") and from_summary.split == "test"
    dev = {"epoch": 2, "split": "validation", **summary["test"]["metrics"]}
    [from_dev] = load_eval_results(dev, default_dataset="builtin")
    assert from_dev.split == "validation" and from_dev.metrics == from_summary.metrics
    assert load_eval_results({**summary, "test": None}) == []
    assert resolve_dataset("data/coco/dataset_coco.json").type == "yerevann/coco-karpathy"  # Karpathy file
    assert not resolve_dataset("data/scenes.json").on_hub and resolve_dataset("me/scenes").on_hub


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"protocol": "all", "metrics": {"i2t_r1": 1.0}}, "metrics lack"),
        (
            {
                "protocol": "all",
                "metrics": dict.fromkeys(REPORTED, 1.0),
            },
            "cannot tell which dataset",
        ),
        ({"loss": 0.3}, "is not an evaluation result"),
    ],
)
def test_bad_evaluation_json_names_the_file_and_the_problem(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as err:
        load_eval_results(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "repo_id", ["granalign", "a/b/c", "/name", "org/", "org/na me", "org/x--y", "org/x.git", 3]
)
def test_repo_ids_that_are_not_namespace_slash_name_are_rejected(repo_id):
    with pytest.raises(PushError, match=r"namespace/name|at most 96"):
        check_repo_id(repo_id)


@pytest.mark.parametrize(
    ("remove", "add", "message"),
    [
        ("model.safetensors", "pytorch_model.bin", "no model weights.*re-save with save_pretrained"),
        ("modeling_granalign.py", None, r"auto_map needs \['modeling_granalign.py'\]"),
        ("processor_config.json", None, "no processor_config.json"),
        ("config.json", None, "no config.json"),
    ],
)
def test_incomplete_model_directories_are_rejected_before_any_upload(
    region_model_dir, tmp_path, remove, add, message
):
    broken = tmp_path / "broken"
    shutil.copytree(region_model_dir, broken)
    (broken / remove).unlink()
    if add:
        (broken / add).write_bytes(b"pickle")
    with pytest.raises(PushError, match=message):
        collect_model_files(broken)
    with pytest.raises(PushError, match="does not exist"):
        collect_model_files(tmp_path / "missing")


def test_the_hub_schema_rejects_bad_metadata():
    def errors(meta: dict, repo_type: str = "model") -> list[str]:
        return validate_card_metadata(f"---\n{yaml.safe_dump(meta)}---\n# card\n", repo_type)[0]

    assert errors({"license": "apache-2.0", "pipeline_tag": "zero-shot-image-classification"}) == []
    assert "license" in errors({"license": "Apache 2"})[0]
    assert "pipeline_tag" in errors({"pipeline_tag": "retrieval"})[0]
    assert "base_model" in errors({"base_model": ["ok/id", "not an id"]})[0]
    index = [
        {
            "name": "m",
            "results": [{"task": {"type": "t"}, "dataset": {"type": "d", "name": "D"}, "metrics": []}],
        }
    ]
    assert "metrics" in errors({"model-index": index})[0]
    assert "configs" in errors({"configs": [{"data_files": "x"}]}, "dataset")[0]
    assert validate_card_metadata("# no metadata", "model") == (
        [],
        ["empty or missing yaml metadata in repo card"],
    )


def test_validate_model_card_catches_a_broken_snippet_and_a_wrong_pipeline_tag(region_model_dir):
    text = str(build_model_card(region_model_dir, "me/grm-regions"))
    with pytest.raises(ValueError, match="usage snippet"):
        validate_model_card(text.replace("with torch.no_grad():", "with torch.no_grad()"))
    with pytest.raises(ValueError, match="pipeline_tag"):
        validate_model_card(text.replace("zero-shot-image-classification", "feature-extraction", 1))


def test_cli_push_parses_its_options_and_dry_run_prints_the_card(region_model_dir, capsys):
    parser = argparse.ArgumentParser()
    add_push_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", str(region_model_dir), "--repo-id", "me/x", "--private", "--revision", "v1",
                              "--eval-json", "coco=a.json", "--eval-json", "b.json", "--dry-run"])  # fmt: skip
    assert args.private and args.revision == "v1" and args.eval_json == ["coco=a.json", "b.json"]
    args.eval_json = None
    assert run_push(args) == 0
    assert "revision='v1'" in capsys.readouterr().out


def test_train_push_flags_fail_before_training_when_incomplete(monkeypatch):
    parser = argparse.ArgumentParser()
    add_train_push_arguments(parser)
    assert push_callback_from_args(parser.parse_args([])) is None
    with pytest.raises(PushError, match="needs --hub-model-id"):
        push_callback_from_args(parser.parse_args(["--push-to-hub"]))
    with pytest.raises(PushError, match="without --push-to-hub"):
        push_callback_from_args(parser.parse_args(["--hub-model-id", "me/x"]))
    with pytest.raises(PushError, match="namespace/name"):
        push_callback_from_args(parser.parse_args(["--push-to-hub", "--hub-model-id", "just-a-name"]))
    hook = push_callback_from_args(
        parser.parse_args(
            ["--push-to-hub", "--hub-model-id", "me/x", "--hub-token", "hf_x", "--hub-push-every-checkpoint"]
        )
    )
    assert hook.repo_id == "me/x" and hook.token == "hf_x" and hook.every_checkpoint
