"""The `granalign` command line: `train | evaluate | push | index | search | explain | demo | export-onnx`.

    granalign train configs/tiny.yaml [--set train.epochs=2 ...] [--output-dir DIR] [--resume [CKPT] | --overwrite-output-dir]
                    [--push-to-hub --hub-model-id org/name]
    granalign evaluate runs/tiny/final [--dataset builtin --dataset-arg num_test=200 ...] [--split test]
                       [--protocol all] [--output-json metrics.json]   (or a Hub id, with --revision)
    granalign push runs/tiny/final --repo-id org/name
    granalign index MODEL ... / granalign search INDEX ...   (see `granalign index --help`)
    granalign explain MODEL --image IMG --text "a caption"  /  granalign demo MODEL
    granalign export-onnx MODEL --output DIR   (the two encoders as ONNX, checked with onnxruntime)

Errors in user input (a bad recipe key, an unknown dataset or protocol, a missing file) print one line
and exit with status 2; `--debug` shows the full traceback instead.

Building the parser imports only `argparse` (`granalign.cli_parsers`), so `--help` is quick: each command
imports torch, transformers and datasets when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from granalign.cli_parsers import (
    add_demo_parser,
    add_explain_parser,
    add_export_onnx_parser,
    add_index_parser,
    add_push_parser,
    add_search_parser,
    add_train_push_arguments,
    lazy_runner,
    parse_key_values,
)

__all__ = ["build_parser", "main"]

_SUBCOMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _SUBCOMMANDS[name] = func
        return func

    return register


@_command("train")
def _train(args: argparse.Namespace) -> int:
    from granalign.hub.cli_push import push_callback_from_args
    from granalign.training.loop import train
    from granalign.training.recipe import load_recipe

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.overwrite_output_dir:
        overrides.append("train.overwrite_output_dir=true")
    recipe = load_recipe(args.recipe, overrides)
    resume: bool | str = False
    if args.resume is not None:
        resume = True if args.resume == "latest" else args.resume
    hub = push_callback_from_args(args)  # fails now, not after training, on bad flags or no token
    main_process = os.environ.get("RANK", "0") == "0"  # accelerate and torchrun set RANK
    if hub is not None and main_process:
        print(f"will push to {hub.prepare()}")
    result = train(
        recipe, resume=resume, hub_callback=hub if hub is not None and hub.every_checkpoint else None
    )
    if hub is not None and main_process and result.final_dir is not None:
        print(f"pushed to {hub.on_train_end(result.final_dir).commit_url}")
    return 0 if result.final_dir is not None or result.interrupted else 1


@_command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from granalign.evaluation.protocols import PROTOCOLS, format_metrics_table, save_metrics_json
    from granalign.evaluation.runner import evaluate_split
    from granalign.hub.loading import load_model_and_processor, model_file
    from granalign.training.builders import get_split, load_recipe_dataset
    from granalign.training.recipe import RECIPE_FILE, DataRecipe, load_recipe

    if args.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {args.protocol!r}; known protocols: {sorted(PROTOCOLS)}")
    if model_file(args.model, "config.json", args.revision) is None:  # before the dataset is built
        raise FileNotFoundError(f"{args.model!r} is not a saved GranAlign model (no config.json)")
    if args.dataset is None:  # the dataset the model was trained on, from its saved recipe
        recipe_file = model_file(args.model, RECIPE_FILE, args.revision)
        if recipe_file is None:
            raise ValueError(f"pass --dataset: {args.model!r} has no {RECIPE_FILE} to take it from")
        data = load_recipe(recipe_file).data
        if args.dataset_arg:
            data.args.update(parse_key_values(args.dataset_arg, "--dataset-arg"))
    else:
        data = DataRecipe(source=args.dataset, args=parse_key_values(args.dataset_arg or [], "--dataset-arg"))
    dataset = load_recipe_dataset(data)
    split = get_split(dataset, args.split, "--split")
    model, processor = load_model_and_processor(args.model, args.device, revision=args.revision)
    options = dict(
        batch_size=args.batch_size, progress=not args.no_progress, check_size=not args.no_size_check
    )
    print(f"{args.model} on {data.source!r} split {args.split!r}, protocol {args.protocol!r}:")
    if args.shortlist is None:
        result = evaluate_split(
            model, processor, split, args.protocol, identical_captions=args.identical_captions, **options
        )
        print(format_metrics_table(result))
    else:
        from granalign.evaluation.two_stage import evaluate_split_two_stage

        result = evaluate_split_two_stage(model, processor, split, args.protocol, args.shortlist,
                                          args.shortlist_by, **options)  # fmt: skip
        seconds, lost = result["seconds"], result["recall_lost"]
        two_stage = f"two-stage ({args.shortlist_by}, shortlist {args.shortlist})"
        print(format_metrics_table({"exhaustive": result["exhaustive"], two_stage: result["two_stage"]}))
        print("recall lost by two-stage: " + ", ".join(f"{key} {value:.2f}" for key, value in lost.items()))
        print(
            f"scoring time: exhaustive {seconds['exhaustive']:.2f} s, two-stage {seconds['two_stage']:.2f} s"
        )
    if args.output_json:
        save_metrics_json(result, args.output_json)
        print(f"wrote {args.output_json}")
    return 0


_SUBCOMMANDS.update(
    push=lazy_runner("granalign.hub.cli_push:run_push"),
    index=lazy_runner("granalign.retrieval.cli_retrieval:run_index"),
    search=lazy_runner("granalign.retrieval.cli_retrieval:run_search"),
    explain=lazy_runner("granalign.viz.cli_viz:run_explain"),
    demo=lazy_runner("granalign.viz.cli_viz:run_demo"),
)
_SUBCOMMANDS["export-onnx"] = lazy_runner("granalign.export_onnx:run_export_onnx")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="granalign", description="GRM fine-grained image-text alignment")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a recipe (YAML/JSON)")
    train.add_argument("recipe", help="recipe file, e.g. configs/tiny.yaml")
    train.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override recipe keys, e.g. train.epochs=2",
    )
    train.add_argument("--output-dir", help="where checkpoints, logs and the final model go")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint of the output dir, or from CHECKPOINT",
    )
    train.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="replace another run found in the output dir (without it, or --resume, it is refused)",
    )

    evaluate = commands.add_parser("evaluate", help="retrieval metrics of a saved model on a dataset split")
    evaluate.add_argument("model", help="a saved model directory (e.g. runs/tiny/final) or Hub id")
    evaluate.add_argument("--revision", help="Hub revision (branch, tag or commit) of MODEL")
    evaluate.add_argument(
        "--dataset", help="'builtin' or a source for load_alignment_dataset (default: the recipe's)"
    )
    evaluate.add_argument(
        "--dataset-arg", action="extend", nargs="+", metavar="KEY=VALUE", help="dataset builder arguments"
    )
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--protocol", default="all", help="all | flickr30k-1k | coco-1k | coco-5k")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    evaluate.add_argument("--output-json", help="write the metrics to this JSON file")
    evaluate.add_argument(
        "--no-size-check", action="store_true", help="allow any image count for the protocol"
    )
    evaluate.add_argument(
        "--identical-captions",
        action="store_true",
        help="also report metrics where a caption counts as correct for every image with an identical caption",
    )
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument(
        "--shortlist",
        type=int,
        metavar="N",
        help="also evaluate two-stage search (shortlist N, then fine-grained re-ranking) and report the "
        "recall it loses against exhaustive scoring",
    )
    evaluate.add_argument(
        "--shortlist-by", default="regions", choices=("regions", "embeddings"), help="two-stage first stage"
    )

    add_train_push_arguments(train)
    add_push_parser(commands)
    add_index_parser(commands)
    add_search_parser(commands)
    add_explain_parser(commands)
    add_demo_parser(commands)
    add_export_onnx_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `granalign` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _SUBCOMMANDS[args.command](args)
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"granalign {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
