"""Command-line pieces for the Hub: running `granalign push` and the `train --push-to-hub` flags (their
parsers live in the light `granalign.cli_parsers`, re-exported here).

granalign push runs/tiny/final --repo-id me/granalign-tiny [--private] [--revision BRANCH]
               [--eval-json [DATASET=]FILE ...] [--token TOKEN] [--with-wheel [WHEEL]] [--dry-run]
granalign train configs/tiny.yaml --push-to-hub --hub-model-id me/granalign-tiny [--hub-private]
                [--hub-revision BRANCH] [--hub-push-every-checkpoint] [--hub-token TOKEN]
"""

from __future__ import annotations

import argparse

from ..cli_parsers import add_push_parser, add_train_push_arguments
from .callback import HubPushCallback
from .eval_results import parse_eval_spec
from .model_dir import verify_model_dir
from .push import PushError, card_for_push, check_repo_id, check_wheel, collect_model_files, push_model_dir

__all__ = ["add_push_parser", "add_train_push_arguments", "push_callback_from_args", "run_push"]


def run_push(args: argparse.Namespace) -> int:
    """Run `granalign push` from parsed arguments; returns the exit status."""
    evals = [parse_eval_spec(spec) for spec in args.eval_json] if args.eval_json else None
    card_kwargs = {"recipe": args.recipe, "license": args.license, "datasets": args.datasets,
                   "base_models": args.base_models, "tags": args.tags or ()}  # fmt: skip
    wheel = getattr(args, "with_wheel", None)
    if wheel == "auto":
        from granalign import __version__

        wheel = f"dist/granalign-{__version__}-py3-none-any.whl"
    if wheel is not None:
        check_wheel(wheel)
    if args.dry_run:
        from .model_card import validate_model_card

        check_repo_id(args.repo_id)
        collect_model_files(args.model_dir)
        verify_model_dir(args.model_dir)  # loads the weights, config and processor it would push
        print(validate_model_card(card_for_push(args.model_dir, args.repo_id, evals, revision=args.revision,
                                                **card_kwargs)))  # fmt: skip
        return 0
    try:
        result = push_model_dir(args.model_dir, args.repo_id, token=args.token, private=args.private,
                                revision=args.revision, commit_message=args.commit_message, eval_json=evals,
                                wheel=wheel, **card_kwargs)  # fmt: skip
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
