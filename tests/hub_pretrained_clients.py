"""Client sides of tests/test_hub_push_to_hub.py, run as fresh processes whose `HF_ENDPOINT` is the test Hub.

    python hub_pretrained_clients.py push SPEC_JSON     granalign installed: `model.push_to_hub`,
                                                        `save_pretrained(push_to_hub=True)`, the processor push
    python hub_pretrained_clients.py remote SPEC_JSON   granalign blocked: load what was pushed with remote
                                                        code, and push from the remote code (transformers' push)

As in `hub_clients.py` (whose helpers are reused), each scenario's outcome goes into one JSON object
printed as the last stdout line, `remote` imports first and waits for the file `spec["go"]`, and only
the standard library is imported at the top.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from hub_clients import _attempt, _BlockGranalign, _scores


def _repo_state(api: Any, repo: str, revision: str | None = None) -> dict[str, Any]:
    """The files, commit titles and README text of `repo` at `revision`."""
    files = sorted(api.list_repo_files(repo, revision=revision))
    readme = None
    if "README.md" in files:
        with open(api.hf_hub_download(repo, "README.md", revision=revision), encoding="utf-8") as handle:
            readme = handle.read()
    titles = [c.title for c in api.list_repo_commits(repo, revision=revision)]
    return {"files": files, "titles": titles, "readme": readme}


def push(spec: dict[str, Any]) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from transformers import PreTrainedModel

    from granalign import GranAlignModel, GranAlignProcessor
    from granalign.hub.pretrained import push_processor_to_hub

    org, results = spec["org"], {}
    api = HfApi()
    model = GranAlignModel.from_pretrained(spec["model_dir"])
    processor = GranAlignProcessor.from_pretrained(spec["model_dir"])
    # `processor.push_to_hub` once GranAlignProcessor delegates it to granalign.hub.pretrained, else the function
    results["processor_override"] = overridden = "push_to_hub" in vars(GranAlignProcessor)

    def push_processor(repo: str, **kwargs: Any) -> Any:
        if overridden:
            return processor.push_to_hub(repo, **kwargs)
        return push_processor_to_hub(processor, repo, **kwargs)

    def model_then_processor() -> dict[str, Any]:
        repo = f"{org}/pth"
        info = model.push_to_hub(repo, commit_message="first push", commit_description="the tiny model",
                                 tags=["my-tag", "granalign"])  # fmt: skip
        first = _repo_state(api, repo)
        description = api.list_repo_commits(repo)[0].message
        push_processor(repo)  # the README is ours: left as it is
        after_processor = _repo_state(api, repo)
        model.push_to_hub(repo, commit_message="second push")  # keeps the processor and its code file
        return {"commit_url": str(info), "oid": info.oid, "first": first, "description": description,
                "after_processor": after_processor, "after_second": _repo_state(api, repo)}  # fmt: skip

    def revision_and_shards() -> dict[str, Any]:
        repo = f"{org}/pth-branch"
        model.push_to_hub(repo, revision="dev", max_shard_size="100KB", private=True)
        return {"dev": _repo_state(api, repo, "dev"), "main": _repo_state(api, repo),
                "private": api.model_info(repo).private}  # fmt: skip

    def bare_name() -> dict[str, Any]:
        info = model.push_to_hub("pth-bare")  # the token's namespace, as with transformers
        return {"repo": info.repo_url.repo_id, "state": _repo_state(api, info.repo_url.repo_id)}

    def create_pr() -> dict[str, Any]:
        return model.push_to_hub(f"{org}/pth-pr", create_pr=True)  # the test Hub refuses pull requests

    def save_with_push() -> dict[str, Any]:
        directory = os.path.join(spec["work_dir"], "pth-saved")
        model.save_pretrained(directory, push_to_hub=True, repo_id=f"{org}/pth-saved",
                              commit_message="saved and pushed", max_shard_size="50GB")  # fmt: skip
        return {"state": _repo_state(api, f"{org}/pth-saved"), "local": sorted(os.listdir(directory))}

    def processor_first() -> dict[str, Any]:
        repo = f"{org}/pth-processor-first"
        info = push_processor(repo, commit_message="processor alone", tags=["lost"])
        alone = _repo_state(api, repo)
        model.push_to_hub(repo)
        return {"oid": info.oid, "alone": alone, "with_model": _repo_state(api, repo)}

    def processor_replaces_placeholder() -> dict[str, Any]:
        repo = f"{org}/pth-placeholder"
        PreTrainedModel.push_to_hub(model, repo)  # transformers' own push: its placeholder card
        placeholder = _repo_state(api, repo)["readme"]
        push_processor(repo, tags=["from-processor"], commit_message="processor push")
        return {"placeholder": placeholder, "state": _repo_state(api, repo)}

    def processor_tags_kept_card() -> dict[str, Any]:
        repo = f"{org}/pth-tags"
        model.push_to_hub(repo, revision="v1")
        before = _repo_state(api, repo, "v1")
        push_processor(repo, revision="v1", tags=["extra-tag"])
        return {"before": before, "after": _repo_state(api, repo, "v1")}

    for scenario in (model_then_processor, revision_and_shards, bare_name, create_pr, save_with_push,
                     processor_first, processor_replaces_placeholder, processor_tags_kept_card):  # fmt: skip
        _attempt(results, scenario.__name__, scenario)
    return results


def remote(spec: dict[str, Any]) -> dict[str, Any]:
    sys.meta_path.insert(0, _BlockGranalign())
    import torch  # noqa: F401  (imported before waiting, like the rest)
    from huggingface_hub import HfApi
    from transformers import AutoModel, AutoProcessor

    deadline = time.monotonic() + 300
    while not os.path.exists(spec["go"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"the pushes never finished: {spec['go']} did not appear")
        time.sleep(0.05)
    repo, results = f"{spec['org']}/pth", {}
    try:
        import granalign  # noqa: F401

        results["granalign_importable"] = True
    except ImportError:
        results["granalign_importable"] = False

    def load() -> dict[str, Any]:
        model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        return {"module": type(model).__module__, "processor": type(processor).__module__,
                "scores": _scores(model, processor)}  # fmt: skip

    def fallback_push() -> dict[str, Any]:
        model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        target = f"{spec['org']}/pth-fallback"
        model.push_to_hub(target, commit_message="pushed from remote code")
        api = HfApi()
        with open(api.hf_hub_download(target, "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        return {"files": sorted(api.list_repo_files(target)), "readme": readme,
                "titles": [c.title for c in api.list_repo_commits(target)]}  # fmt: skip

    _attempt(results, "load", load)
    _attempt(results, "fallback_push", fallback_push)
    return results


if __name__ == "__main__":
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    outcome = {"push": push, "remote": remote}[mode](spec)
    print(json.dumps(outcome))
