"""`push_to_hub` for GranAlign models and processors: the same commit and model card as `granalign push`.

transformers' `PushToHubMixin.push_to_hub` saves the object into a temporary directory and uploads it
with the repo's README, or with a placeholder card ("[More Information Needed]", no license, no
pipeline tag) when the repo has none. `GranAlignPreTrainedModel.push_to_hub` and
`GranAlignProcessor.push_to_hub` come here instead when `granalign` is installed (the model code that
travels with a checkpoint falls back to transformers' push without it):

* a model is saved with `save_pretrained` (`max_shard_size` applies) and pushed by `push_directory`, the
  implementation behind `granalign push`: weights, config and code files in one commit with a freshly
  generated card (its tags are the card's defaults, `model.model_tags` and `tags`); the processor files
  already in the repo, and the code files they need, are kept, stale weights are deleted;
* a processor is saved and its files committed; the README is left as it is unless the repo has none
  (or only transformers' placeholder) and already holds a GranAlign model, in which case the card is
  built from the repo's config, recipe and metrics with this processor. `tags` are added to a README
  that is kept. A processor pushed to a repo without a model writes no README: the model's push will.

Both return the `huggingface_hub.CommitInfo` of the commit, as transformers does.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

from .model_card import validate_model_card
from .model_dir import RECIPE_FILE, read_json
from .push import (
    _remote_files,
    _version,
    card_for_push,
    check_repo_id,
    ensure_branch,
    hub_connection,
    push_directory,
    read_remote_text,
    resolve_token,
)

__all__ = [
    "is_placeholder_card",
    "push_model_to_hub",
    "push_pretrained",
    "push_processor_to_hub",
    "save_and_push_model",
]

logger = logging.getLogger(__name__)
# the description transformers' `create_and_tag_model_card` writes into the placeholder card it makes
_PLACEHOLDER = "This is the model card of a 🤗 transformers model that has been pushed on the Hub."
# what `save_pretrained(..., push_to_hub=True, **kwargs)` takes from kwargs for the push
_SAVE_PUSH_KEYS = ("commit_message", "commit_description", "private", "revision", "create_pr", "tags")
# files of a repo the card of a processor push is built from (with the processor's own config)
_CARD_SOURCES = ("config.json", RECIPE_FILE, "metrics.json", "dev_metrics.json")


def is_placeholder_card(text: str) -> bool:
    """Whether a README is the placeholder card transformers writes when a repo has none."""
    return _PLACEHOLDER in text


def _tag_list(tags: str | Sequence[str] | None, *more: Sequence[str] | None) -> list[str]:
    merged: list[str] = []
    for group in (tags, *more):
        for tag in [group] if isinstance(group, str) else group or ():
            if tag not in merged:
                merged.append(tag)
    return merged


def _api(token: str | bool | None, endpoint: str | None) -> HfApi:
    token = resolve_token(None if isinstance(token, bool) else token)
    return HfApi(endpoint=endpoint, token=token, library_name="granalign", library_version=_version())


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> str:
    """Create the repo if needed; a bare name is put in the token's namespace, as transformers does."""
    if "/" in str(repo_id):
        check_repo_id(repo_id)
    with hub_connection(api.endpoint):  # network failures name the endpoint
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_model_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: str | Sequence[str] | None = None,
    endpoint: str | None = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """`model.push_to_hub(repo_id, ...)` with granalign's card: save the model into a temporary directory
    and push it as `granalign push` does. Takes transformers' `push_to_hub` arguments; `card_kwargs`
    (`eval_json`, `recipe`, `license`, `datasets`, `base_models`) go to the card as in `push_model_dir`."""
    api = _api(token, endpoint)
    repo_id = _create_repo(api, repo_id, private)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        info, *_ = push_directory(
            tmp, repo_id, require_processor=False, token=api.token, private=private, revision=revision,
            commit_message=commit_message or "Upload GranAlign model", commit_description=commit_description,
            create_pr=create_pr, tags=_tag_list(getattr(model, "model_tags", None), tags), endpoint=endpoint,
            **card_kwargs,
        )  # fmt: skip
    return info


def save_and_push_model(
    model: Any, save: Callable[..., Any], save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    """`model.save_pretrained(save_directory, push_to_hub=True, ...)`: `save` (transformers' own
    `save_pretrained`) writes the directory, then the directory is pushed as `granalign push` does (the
    processor, the recipe and metrics are included when they are there). The push arguments are
    transformers': `repo_id` (default: the directory's name), `commit_message`, `token`, `private`,
    `create_pr`, and also `revision`, `commit_description` and `tags`. Only the main process pushes."""
    kwargs.pop("push_to_hub", None)
    if len(args) > 2:  # save_pretrained(directory, is_main_process, state_dict, push_to_hub, ...)
        args = (*args[:2], False, *args[3:])
    push = {key: kwargs.pop(key) for key in _SAVE_PUSH_KEYS if key in kwargs}
    repo_id = kwargs.pop("repo_id", None) or Path(os.path.abspath(save_directory)).name
    token = kwargs.pop("token", None)
    is_main = args[0] if args else kwargs.get("is_main_process", True)
    result = save(save_directory, *args, **kwargs)
    should_save = getattr(model, "should_save_on_this_rank", None)
    if not (should_save(is_main) if callable(should_save) else is_main):
        return result
    api = _api(token, None)
    repo_id = _create_repo(api, repo_id, push.get("private"))
    push_directory(
        save_directory, repo_id, require_processor=False, token=api.token, private=push.get("private"),
        revision=push.get("revision"), commit_message=push.get("commit_message") or "Upload GranAlign model",
        commit_description=push.get("commit_description"), create_pr=push.get("create_pr", False),
        tags=_tag_list(getattr(model, "model_tags", None), push.get("tags")),
    )  # fmt: skip
    return result


def _remote_parameter_count(api: HfApi, repo_id: str, revision: str) -> int | None:
    try:
        counts = api.get_safetensors_metadata(repo_id, revision=revision).parameter_count
    except (OSError, NotASafetensorsRepoError, SafetensorsParsingError) as err:
        logger.info("cannot count the parameters of %s from its safetensors headers: %s", repo_id, err)
        return None
    return sum(counts.values()) or None


def _model_type(config_text: str) -> Any:
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError:
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _processor_readme(
    api: HfApi,
    repo_id: str,
    branch: str,
    saved: Path,
    *,
    tags: list[str],
    revision: str | None,
    **card_kwargs: Any,
) -> str | None:
    """The README a processor push writes, or None to leave the repo's as it is (see the module doc)."""
    remote = _remote_files(api, repo_id, branch)
    text = read_remote_text(api, repo_id, "README.md", branch) if "README.md" in remote else None
    config_text = read_remote_text(api, repo_id, "config.json", branch) if "config.json" in remote else None
    with tempfile.TemporaryDirectory() as card_dir:
        if config_text is not None and (text is None or is_placeholder_card(text)):
            (Path(card_dir) / "config.json").write_text(config_text, encoding="utf-8")
            if _model_type(config_text) == "granalign":
                for name in _CARD_SOURCES[1:]:
                    if name in remote:
                        content = read_remote_text(api, repo_id, name, branch) or ""
                        (Path(card_dir) / name).write_text(content, encoding="utf-8")
                card = card_for_push(
                    card_dir, repo_id, card_kwargs.pop("eval_json", None), tags=tags, revision=revision,
                    processor_config=read_json(saved / "processor_config.json")
                    if (saved / "processor_config.json").is_file() else None,
                    num_parameters=_remote_parameter_count(api, repo_id, branch), **card_kwargs,
                )  # fmt: skip
                validate_model_card(card)
                return str(card)
    if text is None:
        if tags:
            logger.warning("%s has no model yet, so no model card: tags %s not recorded", repo_id, tags)
        return None
    if not tags:
        return None
    try:
        card = ModelCard(text)
    except ValueError as err:  # metadata that does not parse: leave the README alone
        logger.warning("not adding tags %s to the README of %s: %s", tags, repo_id, err)
        return None
    present = list(card.data.tags or [])
    missing = [tag for tag in tags if tag not in present]
    if not missing:
        return None
    card.data.tags = present + missing
    return str(card)


def push_processor_to_hub(
    processor: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: str | Sequence[str] | None = None,
    endpoint: str | None = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """`processor.push_to_hub(repo_id, ...)` that never writes transformers' placeholder card: the saved
    processor's files in one commit, with the README described in the module doc. `max_shard_size` is
    accepted for transformers' signature (a processor has no weights); `card_kwargs` apply when a card is
    written."""
    del max_shard_size
    api = _api(token, endpoint)
    with hub_connection(api.endpoint), tempfile.TemporaryDirectory() as tmp:  # failures name the endpoint
        repo_id = _create_repo(api, repo_id, private)
        branch = ensure_branch(api, repo_id, revision, create_pr=create_pr)
        saved = Path(tmp)
        processor.save_pretrained(saved)
        files = sorted(p for p in saved.rglob("*") if p.is_file() and p.name != "README.md")
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(saved).as_posix(), path_or_fileobj=str(p))
            for p in files
        ]
        readme = _processor_readme(api, repo_id, branch, saved, tags=_tag_list(tags), revision=revision,
                                   **card_kwargs)  # fmt: skip
        if readme is not None:
            operations.append(
                CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8"))
            )
        return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload GranAlign processor",
                                 commit_description=commit_description, revision=branch, create_pr=create_pr)  # fmt: skip


def push_pretrained(obj: Any, repo_id: str, **push_to_hub_kwargs: Any) -> CommitInfo:
    """`push_to_hub` for a GranAlign model or processor: `push_processor_to_hub` for a transformers
    `ProcessorMixin`, else `push_model_to_hub`."""
    from transformers import ProcessorMixin

    if isinstance(obj, ProcessorMixin):
        return push_processor_to_hub(obj, repo_id, **push_to_hub_kwargs)
    return push_model_to_hub(obj, repo_id, **push_to_hub_kwargs)
