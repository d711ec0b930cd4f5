"""The `granalign` command line: a start-up that imports no torch, lazy Auto-class registration, and
`granalign evaluate` of a Hub repo id (against the Hub-API server of `tests/hub_server.py`).

Each check runs in a fresh interpreter: what a process imports, and what `import granalign` registers,
depend on what that process imported before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from tiny_configs import IMAGE_SIZE, TEXT_TOWERS, VISION_TOWERS, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor
from granalign.cli import main

HEAVY = ("torch", "transformers", "datasets", "accelerate", "onnx", "onnxruntime", "onnxscript")
COMMANDS = ("train", "evaluate", "push", "index", "search", "explain", "demo", "export-onnx")
ORG = "granalign-org"


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter; returns the JSON object its last stdout line prints."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded(names: str) -> str:
    return f"{{m: m in sys.modules for m in {names!r}}}"


# ------------------------------------------------------------------------------------------ start-up


def test_building_the_parser_and_every_help_imports_no_torch():
    code = f"""
import contextlib, io, json, sys
import granalign
after_import = {_loaded(HEAVY)}
from granalign.cli import build_parser, main
build_parser()
helps = {{}}
for argv in [["--help"]] + [[c, "--help"] for c in {COMMANDS!r}]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as stop:
            helps[" ".join(argv)] = (stop.code, "usage: granalign" in out.getvalue())
print(json.dumps({{"after_import": after_import, "after_help": {_loaded(HEAVY)}, "helps": helps}}))
"""
    outcome = _python(code)
    assert not any(outcome["after_import"].values()), outcome["after_import"]
    assert not any(outcome["after_help"].values()), outcome["after_help"]
    assert len(outcome["helps"]) == 1 + len(COMMANDS)
    assert all(status == [0, True] for status in outcome["helps"].values()), outcome["helps"]


def test_the_console_script_help_imports_no_torch():
    script = Path(sys.executable).with_name("granalign")
    command = [str(script)] if script.is_file() else ["-m", "granalign.cli"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *command, "evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "or Hub id" in " ".join(done.stdout.split()) and "--revision" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "granalign.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


# --------------------------------------------------------------------------------- Auto registration


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny saved ViT model with its processor and a training recipe naming a small builtin split."""
    root = tmp_path_factory.mktemp("cli-model")
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(root), max_length=16
    )
    directory = root / "model"
    tiny_model("vit").save_pretrained(directory)
    processor.save_pretrained(directory)
    recipe = {
        "name": "tiny",
        "data": {
            "source": "builtin",
            "args": {"num_train": 2, "num_validation": 2, "num_test": 4, "image_size": IMAGE_SIZE},
        },
        "model": {"vision_config": VISION_TOWERS["vit"], "text_config": TEXT_TOWERS["bert"],
                  "tokenizer": "captions", "max_length": 16},
    }  # fmt: skip
    (directory / "granalign_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


_REGISTERED = """
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from granalign.configuration_granalign import GranAlignConfig
from granalign.modeling_granalign import GranAlignModel
registered = {"config": "granalign" in CONFIG_MAPPING, "model": GranAlignConfig in MODEL_MAPPING,
              "processor": GranAlignConfig in PROCESSOR_MAPPING, "tower": "efficientnet_lite" in CONFIG_MAPPING,
              "auto_map": GranAlignModel._auto_class == "AutoModel"}
"""


def test_import_granalign_alone_lets_the_auto_classes_load_a_checkpoint(saved_model):
    code = f"""
import json, sys
import granalign
light = not any({_loaded(HEAVY)}.values())
from transformers import AutoConfig, AutoModel, AutoProcessor
path = {str(saved_model)!r}
loaded = [type(AutoConfig.from_pretrained(path)).__name__, type(AutoModel.from_pretrained(path)).__name__,
          type(AutoProcessor.from_pretrained(path)).__name__]
{_REGISTERED}
print(json.dumps({{"light": light, "loaded": loaded, "registered": registered}}))
"""
    outcome = _python(code)
    assert outcome["light"], "import granalign imported torch or transformers"
    assert outcome["loaded"] == ["GranAlignConfig", "GranAlignModel", "GranAlignProcessor"]
    assert all(outcome["registered"].values()), outcome["registered"]


@pytest.mark.parametrize(
    "imports",
    [
        "from transformers import AutoModel; import granalign",  # registers during `import granalign`
        "from granalign.modeling_granalign import GranAlignModel",  # from inside the package's own imports
        "import granalign; from transformers import pipeline",
    ],
)
def test_every_import_order_registers_before_the_auto_classes_are_used(imports):
    outcome = _python(f"import json\n{imports}\n{_REGISTERED}\nprint(json.dumps(registered))")
    assert all(outcome.values()), outcome


# ------------------------------------------------------------------------------- evaluate a Hub id


def _upload(hub: HubServer, repo_id: str, directory: Path) -> None:
    """Put a folder into a public model repo of the test Hub (weights as LFS objects, like a push)."""
    repo = hub.store.create_repo("model", repo_id, private=False)
    operations = []
    for file in sorted(directory.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            oid = hashlib.sha256(data).hexdigest()
            hub.store.put_lfs_object(repo, oid, data)
            operations.append(("lfsFile", {"path": file.name, "oid": oid}))
        else:
            operations.append(("file", {"path": file.name, "content": base64.b64encode(data).decode()}))
    hub.store.commit(repo, "main", operations, "Upload GranAlign model", "", None)


def _cli_process(argv: list[str], hub: HubServer, home: Path) -> subprocess.Popen:
    """`python -m granalign.cli ARGV` whose Hub is `hub` (clean HF_* environment, its own HF_HOME)."""
    dropped = ("HF_", "HUGGING", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")  # fmt: skip
    command = [sys.executable, "-m", "granalign.cli", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, stdout, stderr


def _one_line_error(outcome: tuple[int, str, str], command: str) -> str:
    """The message of a command that failed with exit status 2 and a one-line error (no traceback)."""
    status, _, stderr = outcome
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"granalign {command}: error: "), lines[0]
    return lines[0]


def test_evaluate_takes_a_hub_repo_id_and_names_a_missing_one_in_one_line(saved_model, tmp_path, capsys):
    local_json, hub_json = tmp_path / "local.json", tmp_path / "hub.json"
    assert main(["evaluate", str(saved_model), "--no-progress", "--output-json", str(local_json)]) == 0
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n")
    capsys.readouterr()
    with HubServer() as hub:
        _upload(hub, f"{ORG}/tiny", saved_model)
        repo, out = f"{ORG}/tiny", str(tmp_path / "index.safetensors")
        # the dataset comes from the recipe saved in the repo, as for a local directory
        found = _cli_process(["evaluate", repo, "--no-progress", "--output-json", str(hub_json)], hub,
                             tmp_path / "home-found")  # fmt: skip
        missing = _cli_process(
            ["evaluate", f"{ORG}/missing", "--dataset", "builtin"], hub, tmp_path / "home-missing"
        )
        # the other commands resolve MODEL the same way
        revision = _cli_process(["index", repo, out, "--captions-file", str(captions), "--revision", "nope"], hub,
                                tmp_path / "home-revision")  # fmt: skip
        outcomes = [_finish(process) for process in (found, missing, revision)]
    status, stdout, stderr = outcomes[0]
    assert status == 0, stderr[-3000:]
    assert f"{repo} on 'builtin' split 'test'" in stdout
    assert json.loads(hub_json.read_text())["metrics"] == json.loads(local_json.read_text())["metrics"]
    assert f"no model repo '{ORG}/missing'" in _one_line_error(outcomes[1], "evaluate")
    assert f"'{repo}' has no revision 'nope'" in _one_line_error(outcomes[2], "index")

    # offline (as this test process is), a repo id that is not in the cache: one line too
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        assert main(["evaluate", f"{ORG}/missing"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "not in the Hub cache" in err, err
