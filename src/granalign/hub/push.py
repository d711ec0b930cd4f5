"""Push a saved GranAlign model directory to the Hugging Face Hub as one atomic commit.

What goes up: the safetensors weights (and their index when sharded), `config.json` with its `auto_map`,
the model code files it names (`*_granalign.py`), the processor and tokenizer files, the training
recipe and metrics JSON when present, the Inference Endpoints custom handler (`handler.py`, with its
`requirements.txt`; see `granalign/hub/templates/handler.py`), a generated model card (`README.md`) and,
when asked (`wheel=`, `granalign push --with-wheel`), a granalign wheel that the Space of
`spaces/app.py` installs the package from (any other `granalign-*.whl` is deleted). Everything is checked
before the first request; the files are then uploaded (LFS objects first) and recorded in a single
commit, so an interrupted push leaves the branch as it was and simply re-running it completes it
(already-uploaded LFS objects are not sent again). Weights and code files of an earlier push that the
new one no longer has are deleted in the same commit.

Authentication follows `huggingface_hub`: an explicit `token`, else `HF_TOKEN`, else the token saved by
`hf auth login`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, get_token
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError

from .eval_results import EvalSource
from .model_card import build_model_card, validate_model_card
from .model_dir import (
    ENDPOINT_FILES,
    RECIPE_FILE,
    PushError,
    collect_model_files,
    load_recipe_dict,
    verify_model_dir,
)

__all__ = [
    "PushError",
    "PushResult",
    "card_for_push",
    "check_repo_id",
    "check_wheel",
    "collect_model_files",
    "push_directory",
    "push_model_dir",
    "resolve_token",
]

# remote files a new push replaces as a whole: stale ones are deleted in the same commit
MANAGED_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "*_granalign.py")
logger = logging.getLogger(__name__)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# a pure-Python granalign wheel (`pip wheel --no-deps .`), pushed beside the model for spaces/app.py
WHEEL_NAME = re.compile(r"^granalign-[A-Za-z0-9_.+!]+-py3-none-any\.whl$")


@dataclass(frozen=True)
class PushResult:
    """The commit a push made: its branch, id and URL, the files it wrote and the stale ones it deleted."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: tuple[str, ...]
    deleted: tuple[str, ...]


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is `namespace/name` as the Hub accepts it, else raise `PushError`."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PushError(
            f"repo id must look like 'namespace/name' (e.g. 'my-org/granalign-base'), got {repo_id!r}"
        )
    if len(repo_id.split("/")[1]) > 96 or repo_id.endswith((".git", ".")):
        raise PushError(
            f"repo name must be at most 96 characters and not end in '.git' or '.', got {repo_id!r}"
        )
    return repo_id


def check_wheel(wheel: str | os.PathLike[str]) -> Path:
    """`wheel` if it is a pure-Python granalign wheel file (`granalign-<version>-py3-none-any.whl`, holding
    the `granalign` package), else raise `PushError` saying how to build one."""
    path = Path(wheel)
    build = "build it with `pip wheel --no-deps --wheel-dir dist .` in the granalign source folder"
    if not path.is_file():
        raise PushError(f"wheel {str(path)!r} does not exist; {build}")
    if not WHEEL_NAME.match(path.name):
        raise PushError(f"{path.name!r} is not a granalign-<version>-py3-none-any.whl wheel; {build}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile:
        raise PushError(f"wheel {str(path)!r} is not a zip archive; {build}") from None
    if "granalign/__init__.py" not in names:
        raise PushError(f"wheel {str(path)!r} does not hold the granalign package; {build}")
    return path


def resolve_token(token: str | None = None) -> str:
    """The token to push with: `token`, else `HF_TOKEN`, else the one saved by `hf auth login`."""
    resolved = token or get_token()
    if not resolved:
        raise PushError(
            "no Hugging Face token: pass --token / token=..., set the HF_TOKEN environment variable, or run "
            "`hf auth login` (a token with write access is needed to push)"
        )
    return resolved


def card_for_push(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    eval_json: EvalSource | Sequence[EvalSource] | str | os.PathLike[str] | Mapping[str, Any] | None,
    **card_kwargs: Any,
) -> ModelCard:
    """The card `push_model_dir` uploads: `build_model_card` with `eval_json`, or when it is None with the
    directory's own metrics (`metrics.json` from training, else `dev_metrics.json`); metrics found that way
    that cannot be read into results are left out with a warning."""
    directory = Path(model_dir)
    if eval_json is not None:
        return build_model_card(directory, repo_id, eval_results=eval_json, **card_kwargs)
    for name, split in (("metrics.json", None), ("dev_metrics.json", "validation")):
        if (directory / name).is_file():
            try:
                return build_model_card(directory, repo_id, eval_results=EvalSource(directory / name, split=split),
                                        **card_kwargs)  # fmt: skip
            except ValueError as err:
                logger.warning("not reporting %s in the model card: %s", directory / name, err)
                break
    return build_model_card(directory, repo_id, **card_kwargs)


def _remote_files(api: HfApi, repo_id: str, revision: str) -> list[str]:
    try:
        return api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return []


def push_model_dir(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = False,
    revision: str | None = None,
    commit_message: str = "Upload GranAlign model",
    commit_description: str | None = None,
    create_pr: bool = False,
    eval_json: EvalSource | Sequence[EvalSource] | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    recipe: Any = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    base_models: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    endpoint: str | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> PushResult:
    """Upload the saved model in `model_dir` with a generated model card to `repo_id` in one commit.

    Creates the repo (`private` applies only when it is created) and the `revision` branch (from `main`)
    if needed; with `create_pr` the commit is opened as a pull request against that branch. `eval_json`
    defaults to the directory's `metrics.json` (training summary) or `dev_metrics.json`; `recipe` to its
    `granalign_recipe.yaml`. `wheel` (a granalign wheel file, see `check_wheel`) is uploaded beside the
    model, replacing any other granalign wheel there. Returns the commit that was made.
    """
    info, names, stale, branch = push_directory(
        model_dir, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
        commit_description=commit_description, create_pr=create_pr, eval_json=eval_json, recipe=recipe,
        license=license, datasets=datasets, base_models=base_models, tags=tags, endpoint=endpoint, wheel=wheel,
    )  # fmt: skip
    return PushResult(repo_id, branch, info.oid, info.commit_url, names, stale)


def push_directory(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    require_processor: bool = True,
    token: str | bool | None = None,
    private: bool | None = False,
    revision: str | None = None,
    commit_message: str = "Upload GranAlign model",
    commit_description: str | None = None,
    create_pr: bool = False,
    eval_json: EvalSource | Sequence[EvalSource] | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    recipe: Any = None,
    endpoint: str | None = None,
    wheel: str | os.PathLike[str] | None = None,
    **card_kwargs: Any,
) -> tuple[CommitInfo, tuple[str, ...], tuple[str, ...], str]:
    """`push_model_dir` without the result wrapper: returns the `CommitInfo`, the files written, the stale
    files deleted and the branch. With `require_processor=False` the directory may hold the model alone
    (`model.push_to_hub`, `model.save_pretrained(..., push_to_hub=True)`): the processor files already
    in the repo are kept, with the code files their `auto_map` names, and the card reads the caption
    length from the repo's `processor_config.json`."""
    check_repo_id(repo_id)
    files = collect_model_files(model_dir, require_processor=require_processor)
    verify_model_dir(model_dir, require_processor=require_processor)
    wheel_path = None if wheel is None else check_wheel(wheel)
    token = resolve_token(None if isinstance(token, bool) else token)
    directory = Path(model_dir)
    names = [p.name for p in files]
    if recipe is not None:  # an explicit recipe replaces the directory's: the card describes it
        files = [p for p in files if p.name != RECIPE_FILE]
        names = [p.name for p in files] + [RECIPE_FILE]
    if wheel_path is not None:
        files, names = [*files, wheel_path], [*names, wheel_path.name]
    api = HfApi(endpoint=endpoint, token=token, library_name="granalign", library_version=_version())
    with hub_connection(api.endpoint):  # network failures name the endpoint
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        branch = ensure_branch(api, repo_id, revision, create_pr=create_pr)
        remote = _remote_files(api, repo_id, branch)
        keep: set[str] = set()
        if "processor_config.json" not in names and "processor_config.json" in remote:
            processor_config = json.loads(
                read_remote_text(api, repo_id, "processor_config.json", branch) or "{}"
            )
            card_kwargs.setdefault("processor_config", processor_config)
            keep = {module + ".py" for module in auto_map_modules(processor_config)}
        card = card_for_push(directory, repo_id, eval_json, recipe=recipe, revision=revision, **card_kwargs)
        validate_model_card(card)
        managed = (*MANAGED_PATTERNS, "granalign-*.whl") if wheel_path is not None else MANAGED_PATTERNS
        stale = [f for f in remote if "/" not in f and f not in names and f not in keep
                 and any(fnmatch.fnmatch(f, p) for p in managed)]  # fmt: skip
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files
        ]
        operations += [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
            for name, path in ENDPOINT_FILES.items()
        ]
        operations.append(
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8"))
        )
        if recipe is not None:
            recipe_yaml = yaml.safe_dump(load_recipe_dict(directory, recipe), sort_keys=False).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo=RECIPE_FILE, path_or_fileobj=recipe_yaml))
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=branch, create_pr=create_pr)  # fmt: skip
        return info, (*names, *ENDPOINT_FILES, "README.md"), tuple(stale), branch


@contextlib.contextmanager
def hub_connection(endpoint: str) -> Iterator[None]:
    """Turn a transport failure (refused connection, DNS, timeout: httpx errors, not `OSError`) into an
    `OSError` that names the endpoint, instead of a traceback from deep inside the HTTP client."""
    try:
        yield
    except HfHubHTTPError:
        raise  # the Hub answered: its own message is already clear
    except Exception as error:
        if type(error).__module__.split(".")[0] not in _TRANSPORT_MODULES:
            raise
        raise OSError(f"could not reach the Hub at {endpoint}: {error}") from None


_TRANSPORT_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


def ensure_branch(api: HfApi, repo_id: str, revision: str | None, *, create_pr: bool = False) -> str:
    """The branch a push commits to (`main` by default), created from `main` when missing. A pull-request
    ref (`refs/pr/N`) is used as it is; when opening a pull request on a repo where you cannot create the
    branch (403), it is assumed to exist, as `transformers` does."""
    branch = revision or "main"
    if branch != "main" and not branch.startswith("refs/pr/"):
        try:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        except HfHubHTTPError as err:
            if not (create_pr and getattr(err.response, "status_code", None) == 403):
                raise
    return branch


def read_remote_text(api: HfApi, repo_id: str, filename: str, revision: str) -> str | None:
    """The text of `filename` in the repo at `revision`, or None when it (or the revision) is not there."""
    try:
        return Path(api.hf_hub_download(repo_id, filename, revision=revision)).read_text(encoding="utf-8")
    except (EntryNotFoundError, RevisionNotFoundError):
        return None


def auto_map_modules(config: Any) -> set[str]:
    """The module names (`processing_granalign`, ...) the `auto_map`s anywhere in a saved config name."""
    found: set[str] = set()
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key == "auto_map" and isinstance(value, Mapping):
                refs = [r for v in value.values() for r in (v if isinstance(v, (list, tuple)) else [v])]
                found |= {r.split("--")[-1].split(".")[0] for r in refs if isinstance(r, str)}
            else:
                found |= auto_map_modules(value)
    return found


def _version() -> str:
    from granalign import __version__

    return __version__
