"""Pushing to the Hub and loading back, end to end: the real `huggingface_hub`, `transformers` and
`datasets` clients (in fresh processes, `tests/hub_clients.py`) against the Hub-API server of
`tests/hub_server.py` on 127.0.0.1. Nothing here contacts the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_server import HubServer
from PIL import Image
from tiny_configs import IMAGE_SIZE, MICRO_RECIPE, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.evaluation.protocols import evaluate_protocols, save_metrics_json

TESTS = Path(__file__).parent
ORG, TOKEN, OTHER_TOKEN = "granalign-org", "hf_alice_write", "hf_bob_write"
CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny saved ViT model + processor + recipe, its sharded twin, and an evaluation JSON."""
    root = tmp_path_factory.mktemp("hub-push")
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(root), max_length=16
    )
    model = tiny_model("vit").eval()
    recipe = {
        "name": "tiny",
        "data": {"source": "builtin", "train_split": "train"},
        "model": {"max_length": 16},
    }
    for name, shard in (("model", "50GB"), ("sharded", "100KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        processor.save_pretrained(root / name)
        (root / name / "granalign_recipe.yaml").write_text(yaml.safe_dump(recipe))
    scores = torch.randn(10, 50, generator=torch.Generator().manual_seed(0))
    results = evaluate_protocols(scores, [i // 5 for i in range(50)], ["all"])
    save_metrics_json(results, root / "eval.json")
    summary = {"best_dev_rsum": 1.0, "dev_history": [], "test": results["all"]}  # as training writes it
    save_metrics_json(summary, root / "sharded" / "metrics.json")
    (root / "empty").mkdir()
    (root / "dev-recipe.yaml").write_text(yaml.safe_dump({**recipe, "name": "dev-run"}))
    micro = {**MICRO_RECIPE, "train": {**MICRO_RECIPE["train"], "checkpoint_every_steps": 0}}
    (root / "micro-recipe.yaml").write_text(yaml.safe_dump(micro))
    return root, model, processor, results["all"]["metrics"]


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: ("alice", [ORG]), OTHER_TOKEN: ("bob", [])}) as server:
        server.fail_next("POST", rf"^/api/models/{ORG}/flaky/commit/", status=500)
        yield server


def _client(mode: str, spec: dict, hub: HubServer, home: Path) -> subprocess.Popen:
    """Start `hub_clients.py MODE` in a fresh process whose Hub is `hub` (clean HF_* env, own HF_HOME)."""
    dropped = ("HF_", "HUGGING", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
               HF_MODULES_CACHE=str(home / "modules"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")  # fmt: skip
    command = [sys.executable, str(TESTS / "hub_clients.py"), mode, json.dumps(spec)]
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=home
    )


def _outcome(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clients(hub, model_dir, tmp_path_factory):
    """Run the pushing client, then the remote-code client (started at once: it imports while waiting)."""
    root, home = model_dir[0], tmp_path_factory.mktemp("client-homes")
    go = home / "pushes-done"
    remote = _client("remote", {"org": ORG, "go": str(go)}, hub, home / "remote")
    try:
        spec = {"org": ORG, "token": TOKEN, "model_dir": str(root / "model"), "sharded_dir": str(root / "sharded"),
                "eval_json": str(root / "eval.json"), "empty_dir": str(root / "empty"),
                "recipe": str(root / "dev-recipe.yaml"), "train_recipe": str(root / "micro-recipe.yaml"),
                "train_output": str(home / "micro-run")}  # fmt: skip
        pushed = _outcome(_client("push", spec, hub, home / "push"))
        go.touch()
        return pushed, _outcome(remote)
    finally:
        remote.kill()


@pytest.fixture(scope="module")
def pushed(clients):
    return clients[0]


@pytest.fixture(scope="module")
def remote(clients):
    return clients[1]


def _ok(outcome: dict) -> dict:
    assert "error" not in outcome, outcome.get("traceback", outcome)
    return outcome


def _local_scores(model, processor) -> torch.Tensor:
    images = [
        Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 48, 3), dtype=np.uint8))
        for s in range(2)
    ]
    with torch.no_grad():
        return model(**processor(text=CAPTIONS, images=images, padding="max_length")).logits_per_image


def _get(hub: HubServer, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(
        hub.endpoint + path, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


# ---------------------------------------------------------------------------------------- pushing
def test_push_uploads_weights_config_code_processor_and_card_to_a_private_repo(pushed, hub):
    outcome = _ok(pushed["private_main"])
    # ... and the Inference Endpoints handler with its requirements
    expected = {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", "granalign_recipe.yaml", ".gitattributes", "handler.py",
                "requirements.txt"}  # fmt: skip
    code = {
        f"{m}_granalign.py"
        for m in ("configuration", "modeling", "processing", "layers", "losses", "outputs", "scoring")
    } | {"efficientnet_lite_granalign.py"}  # the native EfficientNet-Lite tower travels with every model
    assert set(outcome["remote_files"]) == expected | code
    assert outcome["private"] is True
    assert outcome["paths_info"] == [["model.safetensors", True], ["config.json", False]]
    assert _get(hub, f"/api/models/{ORG}/tiny") == 401  # anonymous
    assert _get(hub, f"/api/models/{ORG}/tiny", OTHER_TOKEN) == 404  # someone else
    assert _get(hub, f"/api/models/{ORG}/tiny", TOKEN) == 200


def _weight_uploads(hub: HubServer, repo: str, weights: bytes) -> int:
    """How many times the test Hub received these weights by an LFS PUT for `repo`."""
    oid = hashlib.sha256(weights).hexdigest()
    return sum(m == "PUT" and p.startswith(f"/__lfs/upload/model/{repo}/{oid}") for m, p, _ in hub.requests)


def test_weights_travel_through_lfs_and_resolve_with_linked_etag_and_size(pushed, hub, model_dir):
    _ok(pushed["private_main"])
    _ok(pushed["cli_branch_with_login"])
    weights = (model_dir[0] / "model" / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    assert _weight_uploads(hub, f"{ORG}/tiny", weights) == 1  # pushed to main and dev, uploaded once
    request = urllib.request.Request(f"{hub.endpoint}/{ORG}/tiny/resolve/main/model.safetensors", method="HEAD",
                                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    with pytest.raises(urllib.error.HTTPError) as redirect:
        urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect).open(request, timeout=10)
    headers = redirect.value.headers
    assert redirect.value.code == 302 and headers["X-Linked-Etag"] == f'"{oid}"'
    assert int(headers["X-Linked-Size"]) == len(weights) and len(headers["X-Repo-Commit"]) == 40


def test_missing_token_wrong_token_and_bad_repo_ids_fail_clearly(pushed):
    assert pushed["no_token"]["error"] == "PushError"
    assert "HF_TOKEN" in pushed["no_token"]["message"] and "hf auth login" in pushed["no_token"]["message"]
    assert pushed["wrong_token"]["status"] == 401


def test_cli_push_to_a_branch_with_the_login_token_and_an_explicit_recipe(pushed, hub):
    outcome = _ok(pushed["cli_branch_with_login"])
    assert outcome["status"] == 0
    assert outcome["branches"] == ["dev", "main"]
    assert outcome["titles"][0] == "push to dev"
    repo = hub.store.get("model", f"{ORG}/tiny")
    dev, main = repo.resolve("dev").files, repo.resolve("main").files
    assert yaml.safe_load(hub.store.read(dev["granalign_recipe.yaml"]))["name"] == "dev-run"
    assert yaml.safe_load(hub.store.read(main["granalign_recipe.yaml"]))["name"] == "tiny"
    assert "revision='dev'" in hub.store.read(dev["README.md"]).decode()


def test_a_push_that_fails_mid_way_leaves_nothing_and_a_retry_completes_it(pushed, hub, model_dir):
    outcome = _ok(pushed["flaky"])
    weights = (model_dir[0] / "model" / "model.safetensors").read_bytes()
    assert _weight_uploads(hub, f"{ORG}/flaky", weights) == 1  # the retry did not send them again
    assert outcome["first"] == {"error": "HfHubHTTPError", "status": 500}
    assert outcome["after_failure"] == [".gitattributes"]  # the commit is atomic: nothing half-written
    assert "model.safetensors" in outcome["after_retry"] and "README.md" in outcome["after_retry"]
    assert outcome["commits"] == ["Upload GranAlign model", "initial commit"]


def test_training_hook_pushes_checkpoints_and_the_final_model(pushed):
    outcome = _ok(pushed["callback"])
    assert outcome["titles"] == ["End of training", "Training in progress: step 3, epoch 1", "initial commit"]
    assert len(outcome["failures"]) == 1 and "step 6" in outcome["failures"][0]


def test_train_cli_pushes_each_new_best_and_the_final_model_to_a_private_branch(pushed):
    outcome = _ok(pushed["train_cli"])
    assert outcome["status"] == 0 and outcome["private"] is True
    titles = outcome["titles"]
    assert titles[0] == "End of training" and titles[-1] == "initial commit"
    assert titles[1:-1] and all(t.startswith("Training in progress: step ") for t in titles[1:-1])
    assert outcome["main_files"] == [".gitattributes"]  # everything went to the branch
    for name in ("model.safetensors", "config.json", "modeling_granalign.py", "tokenizer.json",
                 "processor_config.json", "granalign_recipe.yaml", "README.md", "handler.py", "requirements.txt"):  # fmt: skip
        assert name in outcome["files"], name
    meta = yaml.safe_load(Path(outcome["readme"]).read_text().split("---")[1])
    [entry] = meta["model-index"][0]["results"]  # the run's test metrics, from its metrics.json
    assert entry["dataset"]["split"] == "test" and entry["metrics"][-1]["type"] == "rsum"
    torch.testing.assert_close(torch.tensor(outcome["scores"]), torch.tensor(outcome["local_scores"]))


def test_resharded_push_replaces_stale_weights_and_loads_back(pushed, model_dir, hub):
    _, model, processor, metrics = model_dir
    outcome = _ok(pushed["reshard"])
    readme = hub.store.read(hub.store.get("model", f"{ORG}/reshard").resolve("main").files["README.md"])
    [entry] = yaml.safe_load(readme.decode().split("---")[1])["model-index"][0]["results"]  # its metrics.json
    assert entry["dataset"]["type"] == "granalign-synthetic-scenes" and entry["metrics"][-1]["type"] == "rsum"
    assert entry["metrics"][-1]["value"] == round(metrics["rsum"], 2)
    assert outcome["deleted"] == ["model.safetensors"]
    assert "model.safetensors" not in outcome["files"] and "model.safetensors.index.json" in outcome["files"]
    assert sum(f.startswith("model-0") for f in outcome["files"]) >= 2
    torch.testing.assert_close(torch.tensor(outcome["scores"]), _local_scores(model, processor))


# ---------------------------------------------------------------------------------------- loading
def test_with_granalign_installed_the_repo_loads_without_remote_code(pushed, model_dir):
    _, model, processor, _ = model_dir
    outcome = _ok(pushed["local_classes"])
    assert outcome["module"].startswith("granalign.") and outcome["processor"].startswith("granalign.")
    torch.testing.assert_close(torch.tensor(outcome["scores"]), _local_scores(model, processor))


def test_remote_code_loads_without_granalign_and_scores_the_same(remote, model_dir):
    _, model, processor, _ = model_dir
    assert remote["granalign_importable"] is False
    expected = _local_scores(model, processor)
    for revision in ("main", "dev"):
        outcome = _ok(remote[revision])
        assert outcome["module"].startswith("transformers_modules"), outcome["module"]
        assert outcome["processor"].startswith("transformers_modules"), outcome["processor"]
        torch.testing.assert_close(torch.tensor(outcome["scores"]), expected, rtol=1e-5, atol=1e-5)


def test_the_cards_usage_snippet_runs_as_written_against_the_pushed_repo(remote):
    outcome = _ok(remote["snippet"])
    assert f"repo_id = '{ORG}/tiny'" in outcome["code"] and "trust_remote_code=True" in outcome["code"]
    assert outcome["stdout"].startswith("best caption per image: [")


def test_pushed_card_carries_the_evaluation_json_in_its_model_index(pushed, hub, model_dir):
    _ok(pushed["private_main"])
    assert ("POST", "/api/validate-yaml", 200) in hub.requests  # the client had the Hub check the card
    metrics = model_dir[3]
    repo = hub.store.get("model", f"{ORG}/tiny")
    readme = hub.store.read(repo.resolve("main").files["README.md"]).decode()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "zero-shot-image-classification"
    [entry] = meta["model-index"][0]["results"]
    assert entry["dataset"]["config"] == "all" and entry["dataset"]["split"] == "test"
    reported = {m["type"]: m["value"] for m in entry["metrics"]}
    assert reported == {k: round(metrics[k], 2) for k in reported} and len(reported) == 7


def test_builtin_dataset_round_trips_through_push_to_hub_and_load_dataset(pushed):
    outcome = _ok(pushed["dataset"])
    assert outcome["splits"] == ["test", "train", "validation"]
    assert outcome["same"] == {"train": True, "validation": True, "test": True}
    assert outcome["features"] == ["captions", "image", "image_id"]
