"""Command-line pieces for the Hub: the `granalign push` sub-command and the `train --push-to-hub` flags.

granalign push runs/tiny/final --repo-id me/granalign-tiny [--private] [--revision BRANCH]
               [--eval-json [DATASET=]FILE ...] [--token TOKEN] [--dry-run]
granalign train configs/tiny.yaml --push-to-hub --hub-model-id me/granalign-tiny [--hub-private]
                [--hub-revision BRANCH] [--hub-push-every-checkpoint] [--hub-token TOKEN]
"""

from __future__ import annotations

import argparse
from typing import Any

from .callback import HubPushCallback
from .eval_results import parse_eval_spec
from .push import PushError, card_for_push, check_repo_id, collect_model_files, push_model_dir

__all__ = ["add_push_parser", "add_train_push_arguments", "push_callback_from_args", "run_push"]

_TOKEN_HELP = (
    "Hub token (default: the HF_TOKEN environment variable, else the token saved by `hf auth login`)"
)


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `push` sub-command to an `argparse` sub-parsers object; returns its parser."""
    push = subparsers.add_parser(
        "push", help="upload a saved model and its model card to the Hugging Face Hub"
    )
    push.add_argument("model_dir", help="a saved model directory (e.g. runs/tiny/final)")
    push.add_argument(
        "--repo-id", required=True, help="namespace/name of the model repo (created if missing)"
    )
    push.add_argument("--token", help=_TOKEN_HELP)
    push.add_argument(
        "--private", action="store_true", help="create the repo as private (if it does not exist)"
    )
    push.add_argument("--revision", help="branch to push to (created from main if missing; default main)")
    push.add_argument("--commit-message", default="Upload GranAlign model")
    push.add_argument(
        "--eval-json",
        action="append",
        metavar="[DATASET=]FILE",
        help="evaluation JSON for the model-index (repeatable; default: the directory's metrics.json)",
    )
    push.add_argument(
        "--recipe", help="training recipe for the card (default: the directory's granalign_recipe.yaml)"
    )
    push.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
    push.add_argument(
        "--dataset", action="append", dest="datasets", metavar="ID", help="training dataset id on the Hub"
    )
    push.add_argument(
        "--base-model", action="append", dest="base_models", metavar="ID", help="pretrained tower id"
    )
    push.add_argument(
        "--tag", action="append", dest="tags", metavar="TAG", help="extra card tag (repeatable)"
    )
    push.add_argument(
        "--dry-run", action="store_true", help="check the directory and print the card; push nothing"
    )
    return push


def run_push(args: argparse.Namespace) -> int:
    """Run `granalign push` from parsed arguments; returns the exit status."""
    evals = [parse_eval_spec(spec) for spec in args.eval_json] if args.eval_json else None
    card_kwargs = {"recipe": args.recipe, "license": args.license, "datasets": args.datasets,
                   "base_models": args.base_models, "tags": args.tags or ()}  # fmt: skip
    if args.dry_run:
        from .model_card import validate_model_card

        check_repo_id(args.repo_id)
        collect_model_files(args.model_dir)
        print(validate_model_card(card_for_push(args.model_dir, args.repo_id, evals, revision=args.revision,
                                                **card_kwargs)))  # fmt: skip
        return 0
    try:
        result = push_model_dir(args.model_dir, args.repo_id, token=args.token, private=args.private,
                                revision=args.revision, commit_message=args.commit_message, eval_json=evals,
                                **card_kwargs)  # fmt: skip
    except OSError as err:  # network / Hub errors: nothing was committed unless the commit itself succeeded
        raise OSError(
            f"{err}\nre-run the same command to complete the push (uploaded files are not sent twice)"
        ) from err
    print(
        f"pushed {len(result.files)} files to {result.repo_id} (branch {result.revision}): {result.commit_url}"
    )
    if result.deleted:
        print(f"removed stale files: {', '.join(result.deleted)}")
    return 0


def add_train_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `--push-to-hub` family of flags to the `train` sub-command's parser."""
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--push-to-hub", action="store_true", help="push the final model (and card) when training ends"
    )
    hub.add_argument("--hub-model-id", metavar="NAMESPACE/NAME", help="the model repo to push to")
    hub.add_argument("--hub-token", help=_TOKEN_HELP)
    hub.add_argument("--hub-private", action="store_true", help="create the repo as private")
    hub.add_argument("--hub-revision", metavar="BRANCH", help="branch to push to (default main)")
    hub.add_argument(
        "--hub-push-every-checkpoint",
        action="store_true",
        help="also push every model the run saves (each new best on the dev split)",
    )


def push_callback_from_args(args: argparse.Namespace) -> HubPushCallback | None:
    """A `HubPushCallback` for `train --push-to-hub ...` (None without `--push-to-hub`); checks the repo id
    and the token now, so a bad one fails before training rather than after."""
    if not getattr(args, "push_to_hub", False):
        if getattr(args, "hub_model_id", None):
            raise PushError("--hub-model-id was given without --push-to-hub; add --push-to-hub to push")
        return None
    if not args.hub_model_id:
        raise PushError("--push-to-hub needs --hub-model-id NAMESPACE/NAME")
    return HubPushCallback(args.hub_model_id, token=args.hub_token, private=args.hub_private,
                           revision=args.hub_revision, every_checkpoint=args.hub_push_every_checkpoint)  # fmt: skip
