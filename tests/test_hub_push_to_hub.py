"""`model.push_to_hub`, `model.save_pretrained(push_to_hub=True)` and the processor push write granalign's
model card, not transformers' placeholder: the real clients (in fresh processes,
`tests/hub_pretrained_clients.py`) against the Hub-API server of `tests/hub_server.py` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubServer
from tiny_configs import IMAGE_SIZE, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.hub import validate_model_card
from granalign.hub.pretrained import is_placeholder_card

TESTS = Path(__file__).parent
ORG, TOKEN = "granalign-org", "hf_alice_write"
PLACEHOLDER = "[More Information Needed]"
MODEL_CODE = {f"{m}_granalign.py" for m in ("configuration", "modeling", "layers", "losses", "outputs", "scoring",
                                            "efficientnet_lite")}  # fmt: skip
# the Inference Endpoints handler every model push carries
ENDPOINT_FILES = {"handler.py", "requirements.txt"}
PROCESSOR_FILES = {
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processing_granalign.py",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved ViT model with its processor (max_length 16), and the model and processor objects."""
    root = tmp_path_factory.mktemp("push-to-hub")
    processor = GranAlignProcessor(
        image_processor=ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tiny_tokenizer(root),
        max_length=16,
    )
    model = tiny_model("vit").eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, model, processor


def _client(mode: str, spec: dict, hub: HubServer, home: Path) -> subprocess.Popen:
    dropped = ("HF_", "HUGGING", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
               HF_MODULES_CACHE=str(home / "modules"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(TESTS / "hub_pretrained_clients.py"), mode, json.dumps(spec)]
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
def clients(saved, tmp_path_factory):
    """The pushing client, then the remote-code client (started at once: it imports while waiting)."""
    root, home = saved[0], tmp_path_factory.mktemp("push-to-hub-homes")
    go = home / "pushes-done"
    with HubServer(tokens={TOKEN: ("alice", [ORG])}) as hub:
        remote = _client("remote", {"org": ORG, "go": str(go)}, hub, home / "remote")
        try:
            spec = {"org": ORG, "model_dir": str(root / "model"), "work_dir": str(home)}
            pushed = _outcome(_client("push", spec, hub, home / "push"))
            go.touch()
            yield pushed, _outcome(remote), hub
        finally:
            remote.kill()


def _ok(outcome: dict) -> dict:
    assert "error" not in outcome, outcome.get("traceback", outcome)
    return outcome


def _meta(readme: str) -> dict:
    return yaml.safe_load(readme.split("---")[1])


def _assert_granalign_card(readme: str | None) -> dict:
    """The README is granalign's card (valid, licensed, pipeline-tagged, no placeholder); its metadata."""
    assert readme is not None
    validate_model_card(readme)
    meta = _meta(readme)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["library_name"] == "transformers" and "granalign" in meta["tags"]
    assert PLACEHOLDER not in readme and not is_placeholder_card(readme)
    return meta


def test_model_push_to_hub_uploads_weights_code_and_our_card(clients):
    outcome = _ok(clients[0]["model_then_processor"])
    first = outcome["first"]
    assert (
        set(first["files"])
        == {"README.md", "config.json", "model.safetensors", ".gitattributes"} | MODEL_CODE | ENDPOINT_FILES
    )
    meta = _assert_granalign_card(first["readme"])
    assert meta["tags"].count("granalign") == 1 and "my-tag" in meta["tags"]  # merged, not duplicated
    assert "repo_id = 'granalign-org/pth'" in first["readme"] and "revision=" not in first["readme"]
    assert first["titles"] == ["first push", "initial commit"]
    assert outcome["description"] == "the tiny model"
    assert len(outcome["oid"]) == 40 and "/commit/" in outcome["commit_url"]  # a CommitInfo, as transformers


def test_processor_push_keeps_our_card_and_a_later_model_push_keeps_the_processor(clients):
    outcome = _ok(clients[0]["model_then_processor"])
    after = outcome["after_processor"]
    assert after["readme"] == outcome["first"]["readme"]  # the card was ours: left as it is
    assert set(after["files"]) >= PROCESSOR_FILES
    assert after["titles"][0] == "Upload GranAlign processor"
    second = outcome["after_second"]
    assert set(second["files"]) >= PROCESSOR_FILES  # processing_granalign.py is not a stale code file
    assert second["titles"][0] == "second push"
    _assert_granalign_card(second["readme"])
    assert "Captions are cut at 16 tokens" in second["readme"]  # from the repo's processor_config.json


def test_pushed_model_and_processor_load_with_remote_code_and_score_the_same(clients, saved):
    _, model, processor = saved
    remote = clients[1]
    assert remote["granalign_importable"] is False
    outcome = _ok(remote["load"])
    assert outcome["module"].startswith("transformers_modules")
    assert outcome["processor"].startswith("transformers_modules")
    expected = _local_scores(model, processor)
    torch.testing.assert_close(torch.tensor(outcome["scores"]), expected, rtol=1e-5, atol=1e-5)


def _local_scores(model, processor) -> torch.Tensor:
    from hub_clients import _scores

    return torch.tensor(_scores(model, processor))


def test_push_to_hub_honours_revision_max_shard_size_and_private(clients, saved):
    outcome = _ok(clients[0]["revision_and_shards"])
    dev, main = outcome["dev"], outcome["main"]
    assert main["files"] == [".gitattributes"]  # everything went to the branch, created from main
    assert "model.safetensors.index.json" in dev["files"] and "model.safetensors" not in dev["files"]
    assert sum(f.startswith("model-0") for f in dev["files"]) >= 2
    assert set(dev["files"]) >= MODEL_CODE | ENDPOINT_FILES
    _assert_granalign_card(dev["readme"])
    assert "revision='dev'" in dev["readme"]
    assert outcome["private"] is True


def test_push_to_hub_with_a_bare_name_uses_the_tokens_namespace(clients):
    outcome = _ok(clients[0]["bare_name"])
    assert outcome["repo"] == "alice/pth-bare"
    _assert_granalign_card(outcome["state"]["readme"])
    assert "repo_id = 'alice/pth-bare'" in outcome["state"]["readme"]


def test_push_to_hub_create_pr_reaches_the_hub(clients):
    outcome = clients[0]["create_pr"]  # the test Hub has no pull requests: it answers 400
    assert outcome["error"] == "BadRequestError" and outcome["status"] == 400, outcome
    assert "pull requests" in outcome["message"]


def test_save_pretrained_with_push_to_hub_writes_our_card(clients):
    outcome = _ok(clients[0]["save_with_push"])
    state = outcome["state"]
    assert state["titles"] == ["saved and pushed", "initial commit"]
    assert {"config.json", "model.safetensors", "modeling_granalign.py"} | ENDPOINT_FILES <= set(
        state["files"]
    )
    _assert_granalign_card(state["readme"])
    assert (
        "README.md" not in outcome["local"] and "model.safetensors" in outcome["local"]
    )  # no local placeholder


def test_processor_pushed_first_writes_no_card_and_the_model_push_writes_ours(clients):
    outcome = _ok(clients[0]["processor_first"])
    alone = outcome["alone"]
    assert set(alone["files"]) == PROCESSOR_FILES | {".gitattributes"}  # no placeholder README
    assert alone["titles"] == ["processor alone", "initial commit"] and alone["readme"] is None
    with_model = outcome["with_model"]
    _assert_granalign_card(with_model["readme"])
    assert set(with_model["files"]) >= PROCESSOR_FILES
    assert "Captions are cut at 16 tokens" in with_model["readme"]


def test_processor_push_replaces_transformers_placeholder_with_our_card(clients, saved):
    outcome = _ok(clients[0]["processor_replaces_placeholder"])
    assert PLACEHOLDER in outcome["placeholder"]  # what transformers' own push writes
    state = outcome["state"]
    assert state["titles"][0] == "processor push"
    meta = _assert_granalign_card(state["readme"])
    assert "from-processor" in meta["tags"]
    assert "Captions are cut at 16 tokens" in state["readme"]
    parameters = sum(p.numel() for p in saved[1].state_dict().values())
    assert f"| Parameters | {parameters / 1e6:.2f} M |" in state["readme"]  # from the remote safetensors


def test_processor_push_adds_its_tags_to_the_card_it_keeps(clients):
    outcome = _ok(clients[0]["processor_tags_kept_card"])
    before, after = outcome["before"], outcome["after"]
    meta = _assert_granalign_card(after["readme"])
    assert meta["tags"] == [*_meta(before["readme"])["tags"], "extra-tag"]
    assert after["readme"].split("---", 2)[2] == before["readme"].split("---", 2)[2]  # the body is untouched


def test_remote_code_without_granalign_falls_back_to_transformers_push(clients):
    outcome = _ok(clients[1]["fallback_push"])
    assert outcome["titles"] == ["pushed from remote code", "initial commit"]
    assert {"config.json", "model.safetensors", "modeling_granalign.py"} <= set(outcome["files"])
    assert is_placeholder_card(outcome["readme"])  # transformers' own card: granalign was not importable


def test_processor_push_to_hub_is_routed_to_granalign(clients):
    """The processor scenarios above call `processor.push_to_hub` once GranAlignProcessor overrides it."""
    if not clients[0]["processor_override"]:
        pytest.skip("GranAlignProcessor.push_to_hub is not overridden yet: the scenarios call the function")
    assert clients[0]["processor_first"]["alone"]["readme"] is None  # not transformers' placeholder
