"""Loading the model a command names: a saved model directory or a Hub repo id.

The one place where `granalign evaluate | index | search | explain | demo` (and the Space) turn their
MODEL argument into a model and processor. A name that looks like a path (it starts with `.`, `/` or
`~`, has more than one `/`, or exists) must be a complete saved model directory; anything else is a Hub
repo id, at `revision` (branch, tag or commit; default main). Failures raise `FileNotFoundError` /
`OSError` with a one-line message naming the model, which the command line prints (exit status 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["WEIGHT_FILES", "is_local_model", "load_model_and_processor", "model_file"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_local_model(name_or_path: str) -> bool:
    """Whether a MODEL argument names a local directory (else it is a Hub repo id)."""
    return (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()
    )


def _model_dir(name_or_path: str) -> Path:
    """The local model directory, after checking it holds `config.json` and safetensors weights."""
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path!r} is not a saved GranAlign model (no config.json)")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"model directory {name_or_path!r} has no weights (expected {' or '.join(WEIGHT_FILES)})"
        )
    return directory


def _hub_error(repo_id: str, revision: str | None, error: BaseException) -> OSError:
    """A one-line error for a Hub repo that cannot be read (transformers' messages span lines)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    where = f"{repo_id!r} is not a local model directory"
    for cause in causes:
        if isinstance(cause, RepositoryNotFoundError):
            return FileNotFoundError(
                f"{where}, and {constants.ENDPOINT} has no model repo {repo_id!r} (or the token cannot read it)"
            )
        if isinstance(cause, RevisionNotFoundError):
            return FileNotFoundError(f"the Hub model repo {repo_id!r} has no revision {revision!r}")
        if isinstance(cause, LocalEntryNotFoundError):
            return FileNotFoundError(
                f"{where}, and it is not in the Hub cache while {constants.ENDPOINT} cannot be reached "
                "(offline mode, or no network)"
            )
        if isinstance(cause, HFValidationError):
            return FileNotFoundError(f"{where} nor a valid Hub repo id ({cause})")
    lines = [line for line in str(error).splitlines() if line.strip()]
    return OSError(f"cannot load {repo_id!r} from the Hub: {lines[0] if lines else type(error).__name__}")


def model_file(name_or_path: str, filename: str, revision: str | None = None) -> Path | None:
    """A file saved with the model (e.g. `granalign_recipe.yaml`): its local path, downloaded for a Hub
    repo id; None when the model has no such file."""
    if is_local_model(name_or_path):
        path = _model_dir(name_or_path) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except (OSError, ValueError) as error:
        # offline, a LocalEntryNotFoundError (an EntryNotFoundError) says nothing about the file
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            return None
        raise _hub_error(name_or_path, revision, error) from None


def check_device(device: str | None) -> str:
    """`device` if this machine has it (default: cuda if available, else cpu); else a clear `ValueError`."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(parsed.type, False)
    if not available:
        raise ValueError(f"device {device!r} is not available on this machine (cpu is)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model_and_processor(
    name_or_path: str,
    device: str | None = None,
    *,
    revision: str | None = None,
    require_processor: bool = True,
) -> tuple[Any, Any]:
    """Load a `GranAlignModel` (eval mode, on `device`; default cuda if available) and its
    `GranAlignProcessor` from a saved model directory or a Hub repo id.

    With `require_processor=False` the processor is None when none was saved (a region-feature model).
    """

    from safetensors import SafetensorError

    from ..modeling_granalign import GranAlignModel
    from ..processing_granalign import GranAlignProcessor

    local = is_local_model(name_or_path)
    if local:
        name_or_path = str(_model_dir(name_or_path))
    kwargs = {"revision": revision} if revision else {}
    device = check_device(device)  # before loading anything
    try:
        model = GranAlignModel.from_pretrained(name_or_path, **kwargs)
    except RuntimeError as error:  # transformers refuses weights of the wrong shape for the config
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{name_or_path!r}: its weights do not fit its config.json ({first})") from None
    except SafetensorError as error:  # truncated, empty or foreign weights file
        raise ValueError(
            f"{name_or_path!r}: its model.safetensors is damaged or not a safetensors file ({error})"
        ) from None
    except (OSError, ValueError) as error:
        if local:
            raise
        raise _hub_error(name_or_path, revision, error) from None
    try:
        processor = GranAlignProcessor.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        if not require_processor:
            processor = None  # a region-feature model saved without a processor
        elif local:
            raise
        else:
            raise _hub_error(name_or_path, revision, error) from None
    vocabulary = getattr(model.config.text_config, "vocab_size", None)
    if processor is not None and isinstance(vocabulary, int) and len(processor.tokenizer) > vocabulary:
        raise ValueError(
            f"{name_or_path!r}: its tokenizer has {len(processor.tokenizer)} tokens but the text tower only "
            f"{vocabulary} embeddings: the processor files belong to another model"
        )
    return model.to(device).eval(), processor
