"""Client sides of tests/test_hub_push.py, run as fresh processes whose `HF_ENDPOINT` is the test Hub.

    python hub_clients.py push SPEC_JSON     granalign installed: push, CLI, hook, `train --push-to-hub`,
                                             failures, datasets
    python hub_clients.py remote SPEC_JSON   granalign blocked: remote-code loading and the card's snippet

`remote` imports its libraries first and then waits for the file `spec["go"]` to appear, so the test can
start it while `push` is still running (both pay their import time at once).

Each scenario's outcome (or its error) goes into one JSON object printed as the last stdout line, so the
test process asserts on each behaviour separately. Only the standard library is imported at the top:
the `remote` mode must block `granalign` before `transformers` is imported.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]


def _images() -> list[Any]:
    import numpy as np
    from PIL import Image

    return [
        Image.fromarray(np.random.default_rng(s).integers(0, 255, (40, 48, 3), dtype=np.uint8))
        for s in range(2)
    ]


def _scores(model: Any, processor: Any) -> list[list[float]]:
    import torch

    inputs = processor(text=CAPTIONS, images=_images(), padding="max_length")
    with torch.no_grad():
        return model.eval()(**inputs).logits_per_image.tolist()


def _attempt(results: dict[str, Any], name: str, scenario: Callable[[], Any]) -> None:
    try:
        results[name] = scenario()
    except Exception as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        results[name] = {"error": type(err).__name__, "message": str(err), "status": status,
                         "traceback": traceback.format_exc()[-2000:]}  # fmt: skip


@contextlib.contextmanager
def _without_env_token():
    saved = os.environ.pop("HF_TOKEN", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["HF_TOKEN"] = saved


def push(spec: dict[str, Any]) -> dict[str, Any]:
    import argparse

    from huggingface_hub import HfApi, login, logout

    from granalign import GranAlignModel, GranAlignProcessor
    from granalign.hub import EvalSource, HubPushCallback, push_model_dir
    from granalign.hub.cli_push import add_push_parser, run_push

    org, model_dir, results = spec["org"], spec["model_dir"], {}
    api = HfApi()
    evals = EvalSource(spec["eval_json"], dataset="builtin")

    def no_token() -> Any:
        with _without_env_token():
            return push_model_dir(model_dir, f"{org}/never")

    def wrong_token() -> Any:
        return push_model_dir(model_dir, f"{org}/never", token="hf_not_a_real_token")

    def private_main() -> dict[str, Any]:
        result = push_model_dir(model_dir, f"{org}/tiny", private=True, eval_json=evals)
        info = api.model_info(f"{org}/tiny")
        paths = api.get_paths_info(
            f"{org}/tiny", ["model.safetensors", "config.json", "missing.txt"], expand=True
        )
        return {"files": list(result.files), "commit": result.commit_oid, "private": info.private,
                "remote_files": sorted(api.list_repo_files(f"{org}/tiny")), "sha": info.sha,
                "paths_info": [(p.path, getattr(p, "lfs", None) is not None) for p in paths]}  # fmt: skip

    def cli_branch_with_login() -> dict[str, Any]:
        parser = argparse.ArgumentParser()
        add_push_parser(parser.add_subparsers(dest="command"))
        argv = ["push", model_dir, "--repo-id", f"{org}/tiny", "--revision", "dev",
                "--eval-json", f"builtin={spec['eval_json']}", "--commit-message", "push to dev",
                "--recipe", spec["recipe"]]  # fmt: skip
        with _without_env_token():
            login(token=spec["token"])  # what `hf auth login` does: the token file under HF_HOME
            try:
                status = run_push(parser.parse_args(argv))
            finally:
                logout()
        refs = api.list_repo_refs(f"{org}/tiny")
        titles = [c.title for c in api.list_repo_commits(f"{org}/tiny", revision="dev")]
        return {"status": status, "branches": sorted(b.name for b in refs.branches), "titles": titles}

    def flaky() -> dict[str, Any]:
        repo = f"{org}/flaky"
        try:
            push_model_dir(model_dir, repo, eval_json=evals)
            first: Any = "succeeded"
        except OSError as err:
            first = {"error": type(err).__name__, "status": getattr(err.response, "status_code", None)}
        after_failure = sorted(api.list_repo_files(repo))
        push_model_dir(model_dir, repo, eval_json=evals)
        return {"first": first, "after_failure": after_failure, "after_retry": sorted(api.list_repo_files(repo)),
                "commits": [c.title for c in api.list_repo_commits(repo)]}  # fmt: skip

    def callback() -> dict[str, Any]:
        hook = HubPushCallback(f"{org}/run", every_checkpoint=True, eval_json=evals)
        hook.prepare()
        hook.on_save(model_dir, step=3, epoch=1)
        hook.on_save(spec["empty_dir"], step=6, epoch=2)  # not a model: logged, training goes on
        hook.on_train_end(spec["sharded_dir"])
        return {"titles": [c.title for c in api.list_repo_commits(f"{org}/run")], "failures": hook.failures}

    def reshard() -> dict[str, Any]:
        repo = f"{org}/reshard"
        push_model_dir(model_dir, repo)
        sharded = push_model_dir(spec["sharded_dir"], repo)
        files = sorted(api.list_repo_files(repo))
        model = GranAlignModel.from_pretrained(repo)  # no trust_remote_code: granalign is installed
        return {
            "deleted": list(sharded.deleted),
            "files": files,
            "scores": _scores(model, GranAlignProcessor.from_pretrained(repo)),
        }

    def local_classes() -> dict[str, Any]:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(f"{org}/tiny")
        processor = AutoProcessor.from_pretrained(f"{org}/tiny")
        return {"module": type(model).__module__, "processor": type(processor).__module__,
                "scores": _scores(model, processor)}  # fmt: skip

    def dataset() -> dict[str, Any]:
        import numpy as np
        from datasets import load_dataset

        from granalign.data.synthetic import build_synthetic_scenes

        local = build_synthetic_scenes(num_train=6, num_validation=2, num_test=2, image_size=32, seed=0)
        local.push_to_hub(f"{org}/scenes", private=True)
        loaded = load_dataset(f"{org}/scenes")
        same = {split: local[split]["image_id"] == loaded[split]["image_id"]
                and local[split]["captions"] == loaded[split]["captions"]
                and all(np.array_equal(np.asarray(a), np.asarray(b))
                        for a, b in zip(local[split]["image"], loaded[split]["image"], strict=True))
                for split in local}  # fmt: skip
        return {"splits": sorted(loaded), "same": same, "features": sorted(loaded["train"].features)}

    def train_cli() -> dict[str, Any]:
        from granalign.cli import main

        repo, output = f"{org}/trained", spec["train_output"]
        argv = ["train", spec["train_recipe"], "--output-dir", output, "--push-to-hub", "--hub-model-id", repo,
                "--hub-private", "--hub-revision", "runs", "--hub-push-every-checkpoint"]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        pushed_model = GranAlignModel.from_pretrained(repo, revision="runs")
        local = GranAlignModel.from_pretrained(os.path.join(output, "final"))
        return {"status": status, "private": api.model_info(repo).private,
                "titles": [c.title for c in api.list_repo_commits(repo, revision="runs")],
                "files": sorted(api.list_repo_files(repo, revision="runs")),
                "main_files": sorted(api.list_repo_files(repo)),
                "readme": api.hf_hub_download(repo, "README.md", revision="runs"),
                "scores": _scores(pushed_model, GranAlignProcessor.from_pretrained(repo, revision="runs")),
                "local_scores": _scores(local, GranAlignProcessor.from_pretrained(os.path.join(output, "final")))}  # fmt: skip

    for scenario in (no_token, wrong_token, private_main, cli_branch_with_login, flaky, callback, reshard,
                     local_classes, dataset, train_cli):  # fmt: skip
        _attempt(results, scenario.__name__, scenario)
    return results


class _BlockGranalign:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "granalign" or name.startswith("granalign."):
            raise ImportError("granalign is blocked in this process")


def remote(spec: dict[str, Any]) -> dict[str, Any]:
    sys.meta_path.insert(0, _BlockGranalign())
    import time

    import torch  # noqa: F401  (imported before waiting, like the rest)
    from huggingface_hub import hf_hub_download
    from transformers import AutoModel, AutoProcessor

    deadline = time.monotonic() + 300
    while not os.path.exists(spec["go"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"the pushes never finished: {spec['go']} did not appear")
        time.sleep(0.05)
    repo, results = f"{spec['org']}/tiny", {}
    try:
        import granalign  # noqa: F401

        results["granalign_importable"] = True
    except ImportError:
        results["granalign_importable"] = False

    def load(revision: str) -> dict[str, Any]:
        model = AutoModel.from_pretrained(repo, revision=revision, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(repo, revision=revision, trust_remote_code=True)
        return {"module": type(model).__module__, "processor": type(processor).__module__,
                "scores": _scores(model, processor)}  # fmt: skip

    def snippet() -> dict[str, Any]:
        with open(hf_hub_download(repo, "README.md"), encoding="utf-8") as handle:
            card = handle.read()
        code = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<model card snippet>", "exec"), {"__name__": "__main__"})
        return {"code": code, "stdout": out.getvalue()}

    _attempt(results, "main", lambda: load("main"))
    _attempt(results, "dev", lambda: load("dev"))
    _attempt(results, "snippet", snippet)
    return results


if __name__ == "__main__":
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    outcome = {"push": push, "remote": remote}[mode](spec)
    print(json.dumps(outcome))
