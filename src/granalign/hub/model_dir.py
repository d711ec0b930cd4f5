"""Reading a saved GranAlign model directory: which files belong on the Hub, whether it is complete, its
training recipe and its parameter count (from the safetensors headers, without loading a tensor)."""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from granalign.training.recipe import RECIPE_FILE

__all__ = [
    "ENDPOINT_FILES",
    "RECIPE_FILE",
    "UPLOAD_PATTERNS",
    "PushError",
    "collect_model_files",
    "count_safetensors_parameters",
    "load_recipe_dict",
    "read_json",
]

# top-level files of a saved model directory that belong on the Hub (pickles never do)
UPLOAD_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json", "*_granalign.py",
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "*.model",
    "chat_template.jinja", RECIPE_FILE, "metrics.json", "dev_metrics.json",
)  # fmt: skip
# files every pushed repo carries besides the model's own: the Inference Endpoints custom handler (it loads
# the model with remote code, no granalign needed) and the requirements it installs; shipped in templates/
TEMPLATES = Path(__file__).with_name("templates")
ENDPOINT_FILES = {name: TEMPLATES / name for name in ("handler.py", "requirements.txt")}


class PushError(ValueError):
    """A push cannot start (bad repo id, no token, incomplete model directory); the message says why."""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a `PushError` naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PushError(f"cannot read {str(path)!r}: {err}") from None


def count_safetensors_parameters(model_dir: Path) -> int | None:
    """Number of weights in the directory's safetensors files, from their headers (no tensor is read)."""
    total, files = 0, sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total if files else None


def load_recipe_dict(model_dir: str | os.PathLike[str], recipe: Any) -> dict[str, Any] | None:
    """The training recipe as a plain dict: `recipe` (a dict, a `Recipe`, a YAML path) or, when it is None,
    `model_dir/granalign_recipe.yaml` if present."""
    model_dir = Path(model_dir)
    if recipe is None:
        recipe = model_dir / RECIPE_FILE if (model_dir / RECIPE_FILE).is_file() else None
    if recipe is None:
        return None
    if hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    if isinstance(recipe, (str, os.PathLike)):
        try:
            recipe = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read the training recipe {str(recipe)!r}: {err}") from None
    if not isinstance(recipe, Mapping):
        raise ValueError(f"recipe must be a mapping, a Recipe or a YAML file, got {type(recipe).__name__}")
    return dict(recipe)


def collect_model_files(model_dir: str | os.PathLike[str], *, require_processor: bool = True) -> list[Path]:
    """The files of `model_dir` to upload, after checking it is a complete saved GranAlign model (with its
    processor, unless `require_processor` is False)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise PushError(f"model directory {str(directory)!r} does not exist")
    if not (directory / "config.json").is_file():
        raise PushError(
            f"{str(directory)!r} is not a saved model: no config.json (save it with save_pretrained)"
        )
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in UPLOAD_PATTERNS)
    )
    names = {p.name for p in files}
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if missing or not shards:
            raise PushError(
                f"{str(directory)!r}: sharded weights are incomplete, missing {missing or 'every shard'}"
            )
    elif "model.safetensors" not in names:
        pickled = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" (found {pickled}: re-save with save_pretrained, which writes safetensors)" if pickled else ""
        )
        raise PushError(f"{str(directory)!r} has no model weights: model.safetensors is missing{hint}")
    config = read_json(directory / "config.json")
    if config.get("model_type") != "granalign":
        raise PushError(f"{str(directory)!r} holds a {config.get('model_type')!r} model, not a granalign one")
    modules = {ref.split(".")[0] + ".py" for ref in (config.get("auto_map") or {}).values()}
    if not modules:
        raise PushError(
            f"{str(directory)!r}: config.json has no auto_map; save the model with granalign installed"
        )
    missing_code = sorted(m for m in modules if m not in names)
    if missing_code:
        raise PushError(f"{str(directory)!r}: config.json's auto_map needs {missing_code}, which are missing")
    for required in ("processor_config.json", "tokenizer_config.json") if require_processor else ():
        if required not in names:
            raise PushError(
                f"{str(directory)!r} has no {required}: save the processor next to the model "
                "(processor.save_pretrained(model_dir))"
            )
    return files


def verify_model_dir(model_dir: str | os.PathLike[str], *, require_processor: bool = True) -> None:
    """Load what a push would publish and check it: the config validates, every weight of the model is
    in the (uncorrupted) safetensors files and nothing else is, and the processor loads.

    `collect_model_files` checks that the files exist; this catches a truncated `model.safetensors`, a
    hand-edited config or weights saved for another architecture before anything is uploaded.
    """
    from safetensors import SafetensorError

    from granalign.modeling_granalign import GranAlignModel
    from granalign.processing_granalign import GranAlignProcessor

    directory = str(model_dir)
    try:
        _, info = GranAlignModel.from_pretrained(directory, output_loading_info=True)
    except SafetensorError as error:
        raise PushError(f"{directory!r}: its weights are damaged or not safetensors ({error})") from None
    except RuntimeError as error:  # transformers refuses weights of the wrong shape
        first = str(error).strip().splitlines()[0]
        raise PushError(f"{directory!r}: the weights do not fit its config.json ({first})") from None
    except (OSError, ValueError) as error:
        raise PushError(f"{directory!r} does not load as a GranAlign model: {error}") from None
    wrong = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    wrong = {kind: sorted(map(str, keys))[:5] for kind, keys in wrong.items() if keys}
    if wrong:
        raise PushError(f"{directory!r}: the weights do not fit its config.json: {wrong}")
    if require_processor:
        try:
            GranAlignProcessor.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            raise PushError(f"{directory!r}: its processor does not load: {error}") from None
