"""The Inference Endpoints custom handler every pushed repo carries (`handler.py` + `requirements.txt`), for
real: repos pushed to the Hub-API test server (`tests/hub_server.py`) and pulled back in processes where
`granalign` cannot be imported; the handler called directly (`tests/endpoint_clients.py`) and served over
HTTP on 127.0.0.1 by the custom-handler emulator of `tests/endpoint_emulator.py`, which also runs the
model card's endpoint snippet. Nothing here contacts the real Hub.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from endpoint_clients import CAPTIONS, bad_payloads, image_b64, payloads, regions
from hub_server import HubServer
from PIL import Image
from tiny_configs import IMAGE_SIZE, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.hub import build_model_card, validate_model_card
from granalign.hub.model_card import ENDPOINT_URL_PLACEHOLDER, extract_endpoint_snippet
from granalign.hub.model_dir import ENDPOINT_FILES

TESTS = Path(__file__).parent
ORG, TOKEN, ENDPOINT_TOKEN = "granalign-org", "hf_alice_write", "hf_endpoint_caller"
PIXEL_REPO, REGION_REPO = f"{ORG}/grm-endpoint", f"{ORG}/grm-endpoint-regions"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
LATENCY_REQUESTS = 20  # per payload kind, after one warm-up request
# what handler.py may import: the standard library, torch, PIL and transformers (never granalign)
HANDLER_IMPORTS = {
    "__future__",
    "base64",
    "binascii",
    "io",
    "logging",
    "typing",
    "torch",
    "PIL",
    "transformers",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViT model with its processor, and a tiny region-feature model with a tokenizer-only one."""
    root = tmp_path_factory.mktemp("endpoint-models")
    tokenizer = tiny_tokenizer(root)
    models = {}
    for name, vision in (("pixel", "vit"), ("regions", None)):
        image_processor = (
            ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}) if vision else None
        )
        processor = GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=16)
        model = tiny_model(vision).eval()
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        models[name] = (root / name, model, processor)
    return models


def _env(hub: HubServer, home: Path, **extra: str) -> dict[str, str]:
    dropped = ("HF_", "HUGGING", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
               HF_MODULES_CACHE=str(home / "modules"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **extra)  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    return env


def _client(mode: str, spec: dict, hub: HubServer, home: Path) -> subprocess.Popen:
    command = [sys.executable, str(TESTS / "endpoint_clients.py"), mode, json.dumps(spec)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(hub, home), cwd=home)  # fmt: skip


def _outcome(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _ready(process: subprocess.Popen, ready: Path, log: Path) -> dict:
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the endpoint emulator did not start (rc {process.poll()}):\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.05)
    return json.loads(ready.read_text())


@pytest.fixture(scope="module")
def endpoint(saved, tmp_path_factory):
    """Start the handler client and the emulator (both import while the push runs), push both models, then
    collect the direct calls and wait until the emulator serves the pixel model's repo."""
    home = tmp_path_factory.mktemp("endpoint-homes")
    go, ready, log = home / "pushes-done", home / "emulator-ready.json", home / "emulator.log"
    spec = {"go": str(go), "work_dir": str(home / "pulled"), "pixel_repo": PIXEL_REPO, "regions_repo": REGION_REPO,
            "pixel_dir": str(saved["pixel"][0]), "regions_dir": str(saved["regions"][0])}  # fmt: skip
    with HubServer(tokens={TOKEN: ("alice", [ORG])}) as hub:
        direct = _client("direct", spec, hub, home / "direct")
        # one torch thread: on this shared 2-core machine two threads' barriers wait on descheduled peers,
        # and the latency measured would be the scheduler's, not the handler's
        env = _env(hub, home / "emulator", HF_MODEL_ID=PIXEL_REPO, HF_MODEL_DIR=str(home / "repository"),
                   ENDPOINT_TOKEN=ENDPOINT_TOKEN, OMP_NUM_THREADS="1")  # fmt: skip
        with open(log, "w") as log_file:
            emulator = subprocess.Popen([sys.executable, str(TESTS / "endpoint_emulator.py"), str(ready), str(go)],
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=home / "emulator")  # fmt: skip
        try:
            pushed = _outcome(_client("push", spec, hub, home / "push"))
            go.touch()
            called = _outcome(direct)
            info = _ready(emulator, ready, log)
            yield {"pushed": pushed, "direct": called, "url": f"http://127.0.0.1:{info['port']}", "info": info,
                   "hub": hub, "log": log}  # fmt: skip
        finally:
            direct.kill()
            emulator.kill()
            emulator.wait(timeout=30)


def _ok(outcome: dict) -> dict:
    assert "error" not in outcome or "traceback" not in outcome, outcome.get("traceback", outcome)
    return outcome


def _post(url: str, body: bytes, content_type: str = "application/json", token: str | None = ENDPOINT_TOKEN,
          path: str = "/") -> tuple[int, object]:  # fmt: skip
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_json(url: str, payload: object, **kwargs) -> tuple[int, object]:
    return _post(url, json.dumps(payload).encode(), **kwargs)


# ---------------------------------------------------------------------------------------- offline
def test_the_handler_imports_nothing_of_granalign_and_requirements_match_the_package():
    source = ENDPOINT_FILES["handler.py"].read_text()
    tree = ast.parse(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= HANDLER_IMPORTS, imported - HANDLER_IMPORTS
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    methods = {f.name: f for f in classes["EndpointHandler"].body if isinstance(f, ast.FunctionDef)}
    init = methods["__init__"].args
    assert [a.arg for a in init.args] == ["self", "path"] and ast.literal_eval(init.defaults[0]) == ""
    assert [a.arg for a in methods["__call__"].args.args] == ["self", "data"]
    lines = [line.strip() for line in ENDPOINT_FILES["requirements.txt"].read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    pyproject = (TESTS.parent / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE).group(1)
    assert requirements == re.findall(r'"(transformers[^"]*)"', dependencies)  # the package's own floor


def test_the_card_documents_the_payloads_with_widget_examples_the_handler_takes(saved):
    pixel = build_model_card(saved["pixel"][0], PIXEL_REPO)
    meta = yaml.safe_load(str(pixel).split("---")[1])
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and meta["library_name"] == "transformers"
    zero_shot, caption = meta["widget"]
    assert zero_shot["src"].startswith("https://") and len(zero_shot["candidate_labels"].split(",")) == 2
    assert caption["text"] and set(caption) == {"text", "example_title"}
    text = str(pixel)
    for payload in ('"candidate_labels"', '{"inputs": "a caption"}', '"image-feature-extraction"',
                    '{"inputs": {"image": IMAGE, "captions"', '{"error": "...", "field": "..."}'):  # fmt: skip
        assert payload in text, payload
    assert ENDPOINT_URL_PLACEHOLDER in extract_endpoint_snippet(pixel)
    regions_card = build_model_card(saved["regions"][0], REGION_REPO)
    assert [set(w) for w in yaml.safe_load(str(regions_card).split("---")[1])["widget"]] == [
        {"text", "example_title"}
    ]
    assert '{"regions": [[' in extract_endpoint_snippet(regions_card)
    validate_model_card(regions_card)
    broken = text.replace("  candidate_labels: playing music, playing sports\n", "")
    with pytest.raises(ValueError, match=r"widget\[0\].candidate_labels"):
        validate_model_card(broken)
    with pytest.raises(ValueError, match="endpoint snippet"):
        validate_model_card(text.replace("def query(payload):", "def query(payload)"))


# ---------------------------------------------------------------------------------------- pushed repos
def test_every_push_uploads_the_handler_and_its_requirements(endpoint):
    for name in ("pixel", "regions"):
        files = _ok(endpoint["pushed"][name])["files"]
        assert {"handler.py", "requirements.txt", "README.md", "config.json"} <= set(files), files
    store = endpoint["hub"].store
    hub_files = store.get("model", PIXEL_REPO).resolve("main").files
    assert store.read(hub_files["handler.py"]) == ENDPOINT_FILES["handler.py"].read_bytes()
    assert store.read(hub_files["requirements.txt"]) == ENDPOINT_FILES["requirements.txt"].read_bytes()


def test_handler_serves_each_payload_kind_without_granalign(endpoint, saved):
    direct = endpoint["direct"]
    assert direct["granalign_importable"] is False
    for name, region_model in (("pixel", False), ("regions", True)):
        outcome = _ok(direct[name])
        assert outcome["model_module"].startswith("transformers_modules"), outcome["model_module"]
        assert {"handler.py", "requirements.txt"} <= set(outcome["files"])
        answers, reference = outcome["answers"], outcome["reference"]
        _, model, processor = saved[name]
        local = _local_reference(model, processor, region_model)  # granalign's own classes, in this process
        ranking = answers["zero_shot"]
        assert [r["label"] for r in ranking] == sorted(CAPTIONS, key=lambda c: -reference["zero_shot"][c])
        assert sum(r["score"] for r in ranking) == pytest.approx(1.0)
        for r in ranking:
            assert r["score"] == pytest.approx(reference["zero_shot"][r["label"]], abs=1e-5)
            assert r["score"] == pytest.approx(local["zero_shot"][r["label"]], abs=1e-5)
        if not region_model:  # as the hosted zero-shot task (the pipeline) ranks them
            pipeline_ranking = reference["pipeline"]
            assert [r["label"] for r in ranking] == [r["label"] for r in pipeline_ranking]
            for ours, theirs in zip(ranking, pipeline_ranking, strict=True):
                assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert {r["label"] for r in answers["zero_shot_comma_labels"]} == {"two dogs", "a small green star"}
        assert {r["label"] for r in answers["zero_shot_template"]} == set(CAPTIONS)
        _same(answers["caption_embedding"], local["captions"][0])
        _same(answers["caption_embeddings"], local["captions"])
        _same(answers["caption_embeddings"], reference["caption_embeddings"])
        _same(answers["image_embedding"], local["image"])
        _same(answers["image_embedding"], reference["image_embedding"])
        assert len(answers["image_embeddings_inferred"]) == 2
        _same(answers["image_embeddings_inferred"][0], local["image"])
        assert len(answers["caption_embedding"]) == model.config.embed_dim
        for key in ("scores", "scores_explicit"):
            assert [r["caption"] for r in answers[key]] == CAPTIONS
            _same([r["score"] for r in answers[key]], local["scores"])
        _same([r["score"] for r in answers["scores"]], reference["scores"])


def _same(actual, expected) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def _local_reference(model, processor, region_model: bool) -> dict:
    if region_model:
        image_inputs = dict(processor(regions=[regions(0)]))
        image_inputs = {k: image_inputs[k] for k in ("region_features", "region_mask")}
    else:
        image = Image.open(io.BytesIO(base64.b64decode(image_b64(0))))
        image_inputs = {"pixel_values": processor(images=[image])["pixel_values"]}
    text = processor(text=CAPTIONS, padding="longest")
    text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    with torch.no_grad():
        probabilities = model(**text, **image_inputs).logits_per_image[0].softmax(-1).tolist()
        return {
            "zero_shot": dict(zip(CAPTIONS, probabilities, strict=True)),
            "captions": model.get_text_features(**text).pooler_output.tolist(),
            "image": model.get_image_features(**image_inputs).pooler_output[0].tolist(),
            "scores": model.score(model.encode_image(**image_inputs), model.encode_text(**text))[0].tolist(),
        }


EXPECTED_FIELDS = {
    "no_inputs": "inputs",
    "not_an_object": "inputs",
    "empty_labels": "parameters.candidate_labels",
    "label_not_a_string": "parameters.candidate_labels[1]",
    "zero_shot_without_labels": "parameters.candidate_labels",
    "unknown_task": "parameters.task",
    "unknown_parameter": "parameters.top_k",
    "parameters_not_an_object": "parameters",
    "bad_base64": "inputs",
    "not_an_image": "inputs",
    "url_is_not_fetched": "inputs",
    "scores_without_captions": "inputs.captions",
    "scores_caption_empty": "inputs.captions[1]",
    "too_many_captions": "inputs",
    "too_many_images": "inputs",
    "mixed_inputs": "inputs",
    "regions_for_pixel_model": "inputs",
    "image_for_region_model": "inputs",
}


@pytest.mark.parametrize("name", ["pixel", "regions"])
def test_bad_payloads_get_an_error_naming_the_field_never_a_traceback(endpoint, name):
    errors = _ok(endpoint["direct"][name])["errors"]
    assert set(errors) == set(bad_payloads(name == "regions"))
    for key, answer in errors.items():
        assert set(answer) == {"error", "field"}, (key, answer)
        assert answer["field"] == EXPECTED_FIELDS[key], (key, answer)
        assert "Traceback" not in answer["error"] and answer["error"], (key, answer)
    assert "URLs and paths are not fetched" in errors["url_is_not_fetched"]["error"] or name == "regions"
    assert "at most 64" in errors["too_many_captions"]["error"]
    assert "at most 16" in errors["too_many_images"]["error"]


# ---------------------------------------------------------------------------------------- over HTTP
def test_the_emulator_pulls_the_repo_installs_nothing_and_serves_the_handler(endpoint):
    info = endpoint["info"]
    assert {"handler.py", "requirements.txt", "config.json", "model.safetensors"} <= set(info["files"])
    assert "transformers" in info["pip"] and "already satisfied" in info["pip"].lower()
    with _OPENER.open(endpoint["url"] + "/health", timeout=10) as response:
        assert response.status == 200 and response.read() == b"Ok"
    status, answer = _post_json(endpoint["url"], {"inputs": CAPTIONS[0]}, token="hf_wrong")
    assert status == 401
    # a body without inputs is refused by the server itself, as Endpoints does
    status, answer = _post_json(endpoint["url"], {"parameters": {}})
    assert status == 400 and "inputs" in answer["error"]


def test_each_payload_kind_over_http_matches_the_direct_call(endpoint):
    direct = endpoint["direct"]["pixel"]["answers"]
    for key, payload in payloads(region_model=False).items():
        status, answer = _post_json(endpoint["url"], payload, path="/predict" if key == "scores" else "/")
        assert status == 200, (key, answer)
        torch.testing.assert_close(_numbers(answer), _numbers(direct[key]), rtol=1e-5, atol=1e-6)
    for key, payload in bad_payloads(region_model=False).items():
        status, answer = _post_json(endpoint["url"], payload)
        if key in ("no_inputs", "not_an_object"):  # refused by the server, as above
            assert status == 400 and "inputs key" in answer["error"], (key, answer)
        else:  # the handler answers
            assert status == 200 and answer["field"] == EXPECTED_FIELDS[key], (key, answer)


def test_a_raw_image_body_gets_its_embedding_and_query_labels_classify_it(endpoint):
    png = base64.b64decode(image_b64(0))
    status, embedding = _post(endpoint["url"], png, content_type="image/png")
    assert status == 200
    torch.testing.assert_close(
        _numbers(embedding), _numbers(endpoint["direct"]["pixel"]["answers"]["image_embedding"])
    )
    status, ranking = _post(
        endpoint["url"],
        png,
        content_type="image/png",
        path="/?" + urllib.parse.urlencode({"candidate_labels": "two dogs,a cat"}),
    )
    assert status == 200 and {r["label"] for r in ranking} == {"two dogs", "a cat"}


def test_the_cards_endpoint_snippet_runs_against_the_emulator(endpoint, monkeypatch):
    hub = endpoint["hub"]
    readme = hub.store.read(hub.store.get("model", PIXEL_REPO).resolve("main").files["README.md"]).decode()
    snippet = extract_endpoint_snippet(readme)
    assert ENDPOINT_URL_PLACEHOLDER in snippet and "import requests" in snippet
    monkeypatch.setenv("HF_TOKEN", ENDPOINT_TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet.replace(ENDPOINT_URL_PLACEHOLDER, endpoint["url"]), "<endpoint snippet>", "exec"),
             {"__name__": "__main__"})  # fmt: skip
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("best label: ") and lines[1].startswith("cosines: [")
    assert [line.split("  ", 1)[1] for line in lines[2:]] == [
        "a red circle left of a blue square", "a small green star", "two yellow triangles"
    ]  # fmt: skip


def test_latency_per_request_on_the_tiny_model(endpoint, record_property):
    """Wall time of one HTTP request per payload kind (min, median, 90th percentile), and the handler's own
    share of it from the emulator's log; reported (`-rA` prints it), bounded only loosely: the CPUs are
    shared, so the numbers vary with the machine's load."""
    kinds = {key: payloads(region_model=False)[key]
             for key in ("zero_shot", "caption_embeddings", "image_embedding", "scores")}  # fmt: skip
    report = {}
    for key, payload in kinds.items():
        body = json.dumps(payload).encode()
        _post(endpoint["url"], body)  # warm-up
        logged = len(endpoint["log"].read_text())
        times = []
        for _ in range(LATENCY_REQUESTS):
            start = time.perf_counter()
            status, _ = _post(endpoint["url"], body)
            times.append((time.perf_counter() - start) * 1000)
            assert status == 200
        handler = sorted(
            float(m) for m in re.findall(r"Duration: ([\d.]+) ms", endpoint["log"].read_text()[logged:])
        )
        times.sort()
        report[key] = {"min_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1),
                       "p90_ms": round(times[int(0.9 * len(times)) - 1], 1),
                       "handler_median_ms": round(statistics.median(handler), 1)}  # fmt: skip
    record_property("endpoint_latency_ms", report)
    print("\nendpoint latency per request (tiny model, CPU):", json.dumps(report))
    assert all(r["median_ms"] < 1000 for r in report.values()), report  # a model reload would take seconds


def _numbers(value) -> torch.Tensor:
    """The numbers of an answer, in order (labels and captions dropped)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return torch.tensor([r["score"] for r in value])
    return torch.tensor(value)
