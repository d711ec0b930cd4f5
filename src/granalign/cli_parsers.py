"""Argument parsers of the `granalign` sub-commands `push | index | search | explain | demo | export-onnx`,
and the `train --push-to-hub` flags.

This module imports only `argparse`, so `granalign --help` and `granalign COMMAND --help` start in a
fraction of a second: the commands themselves (`granalign.hub.cli_push`, `granalign.retrieval.cli_retrieval`,
`granalign.viz.cli_viz`) import torch and transformers, and are imported only when a command runs
(`lazy_runner`). Choices and defaults that mirror library constants are kept literal here; the tests
check them against the library.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_IMAGE_QUERY_SHORTLIST",
    "DEFAULT_SHORTLIST",
    "MODES",
    "SHORTLIST_SOURCES",
    "add_demo_parser",
    "add_explain_parser",
    "add_export_onnx_parser",
    "add_index_parser",
    "add_push_parser",
    "add_search_parser",
    "add_train_push_arguments",
    "lazy_runner",
    "parse_key_values",
]

MODES = ("two-stage", "exhaustive")  # granalign.retrieval.search.MODES
TOKEN_CODECS = ("float32", "float16", "int8")  # granalign.retrieval.multivector.CODECS
TOKEN_FIRST_STAGES = ("centroids", "tokens")  # granalign.retrieval.multivector.FIRST_STAGE_MODES
TOKEN_CENTROIDS = ("auto", "ivf", "IMI2x<b>")  # granalign.retrieval.multivector.CENTROID_QUANTIZERS
DEFAULT_SHORTLIST = 20  # granalign.retrieval.search.DEFAULT_SHORTLIST
DEFAULT_IMAGE_QUERY_SHORTLIST = 50  # granalign.retrieval.search.DEFAULT_IMAGE_QUERY_SHORTLIST
SHORTLIST_SOURCES = ("regions", "embeddings")  # granalign.retrieval.shortlist.SHORTLIST_SOURCES
BACKENDS = ("auto", "matmul", "faiss")  # granalign.retrieval.shortlist.BACKENDS
DEFAULT_CHUNK_SIZE = 1024  # images per chunk of a streamed `index --token-index` build

_TOKEN_HELP = (
    "Hub token (default: the HF_TOKEN environment variable, else the token saved by `hf auth login`)"
)


def lazy_runner(target: str) -> Callable[[argparse.Namespace], int]:
    """A command runner that imports `"package.module:function"` only when it is called."""
    module_name, function_name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module_name), function_name)(args)

    run.__name__ = run.__qualname__ = function_name
    run.__doc__ = f"Run `{target}` (imported on the first call)."
    return run


# ---------------------------------------------------------------------------------------------- push


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
        "--with-wheel",
        nargs="?",
        const="auto",
        metavar="WHEEL",
        help="also upload a granalign wheel (default: dist/granalign-<version>-py3-none-any.whl, from "
        "`pip wheel --no-deps --wheel-dir dist .`), which the Space of spaces/app.py installs granalign from",
    )
    push.add_argument(
        "--dry-run", action="store_true", help="check the directory and print the card; push nothing"
    )
    return push


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


# ------------------------------------------------------------------------------------ index / search


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of MODEL")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=32, help="items encoded per batch")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_index_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `granalign index` to an `argparse` sub-parser collection; returns the new parser."""
    parser = subparsers.add_parser("index", help="encode a gallery once and store its features")
    parser.add_argument("model", help="saved model directory or Hub id")
    parser.add_argument("output", help="index file to write, e.g. gallery.safetensors")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders (recursive)")
    source.add_argument("--dataset", help="'builtin' or a source for load_alignment_dataset")
    source.add_argument(
        "--captions-file", help="text file, one caption per line ('id<TAB>caption' also works)"
    )
    source.add_argument("--regions", help=".npy [N, R, D] or .npz with 'features' (+ 'mask' [N, R], 'ids')")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="with --images: leave out (and list) files that cannot be read, instead of stopping",
    )
    parser.add_argument("--split", default="test", help="dataset split (with --dataset)")
    parser.add_argument(
        "--dataset-arg", action="append", metavar="KEY=VALUE", help="dataset builder argument"
    )
    parser.add_argument(
        "--captions", action="store_true", help="with --dataset: index its captions, not images"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the items to an existing index")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing index")
    tokens = parser.add_argument_group(
        "token index",
        "a multi-vector image index for large galleries (OUTPUT is a directory; needs faiss), built chunk "
        "by chunk; `accelerate launch --num_processes N -m granalign.cli index ...` shards the encoding",
    )
    tokens.add_argument(
        "--token-index",
        action="store_true",
        help="write a TokenIndex (token store + FAISS / centroid first stage) instead of a feature file",
    )
    tokens.add_argument("--codec", default="int8", choices=TOKEN_CODECS, help="token storage (token index)")
    tokens.add_argument(
        "--first-stage-tokens", type=int, default=32, help="tokens per image in the first stage (0: all)"
    )
    tokens.add_argument(
        "--rerank-tokens", type=int, default=0, help="tokens per image kept for the re-rank (0: all, exact)"
    )
    tokens.add_argument(
        "--token-factory",
        default="auto",
        help="FAISS index_factory of the first stage, e.g. IVF1024,PQ64x4fs (auto: IVF<n>,Flat, n from "
        "the gallery size times the first chunk's first-stage tokens per image)",
    )
    tokens.add_argument(
        "--centroids",
        default="auto",
        metavar="|".join(TOKEN_CENTROIDS),
        help="coarse quantizer of the centroid first stage: ivf (the IVF factory's lists), IMI2x<b> (an "
        "inverted multi-index of 4^b cells, b in 1..8) or auto (ivf, or IMI2x8 once PLAID's cell count for "
        "the gallery size reaches 65,536: ~524k images at 32 tokens)",
    )
    tokens.add_argument(
        "--centroids-only",
        action="store_true",
        help="add no token vectors to FAISS (no --first-stage tokens search): the centroid first stage needs "
        "only each token's coarse centroid",
    )
    tokens.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="images encoded and added at a time: the build holds one chunk's outputs in memory (a multiple "
        "of --batch-size encodes the batches a one-chunk build would)",
    )
    _add_model_options(parser)
    return parser


def add_search_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `granalign search` to an `argparse` sub-parser collection; returns the new parser."""
    parser = subparsers.add_parser("search", help="top-k of a gallery index for text or image queries")
    parser.add_argument("index", help="an index file written by `granalign index`")
    parser.add_argument("model", help="the model that built the index (directory or Hub id)")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--text", nargs="+", metavar="CAPTION", help="caption queries (image index)")
    queries.add_argument("--image", nargs="+", metavar="PATH", help="image queries (caption index)")
    queries.add_argument("--regions", help="region-feature queries, as for `granalign index --regions`")
    parser.add_argument("-k", "--top-k", type=int, default=10)
    parser.add_argument("--mode", default="two-stage", choices=MODES)
    parser.add_argument(
        "--shortlist",
        type=int,
        help=f"two-stage shortlist size (default {DEFAULT_SHORTLIST} for text queries, "
        f"{DEFAULT_IMAGE_QUERY_SHORTLIST} for image queries)",
    )
    parser.add_argument(
        "--shortlist-by",
        default="regions",
        choices=SHORTLIST_SOURCES,
        help="first stage of two-stage search",
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="embedding shortlist backend")
    parser.add_argument("--faiss-factory", default="Flat", help="FAISS index factory string, e.g. HNSW32")
    tokens = parser.add_argument_group(
        "token index",
        "for INDEX written by `granalign index --token-index` (--shortlist: re-ranked candidates)",
    )
    tokens.add_argument(
        "--first-stage",
        choices=TOKEN_FIRST_STAGES,
        help="token-index first stage (default: centroids where the index stores them)",
    )
    tokens.add_argument(
        "--nprobe", type=int, default=2, help="centroids probed per caption token (centroids)"
    )
    tokens.add_argument("--ndocs", type=int, default=256, help="candidates scored by centroid interaction")
    tokens.add_argument(
        "--refine",
        type=int,
        help="of those, re-scored on first-stage token codes (0: off; default 64 if stored)",
    )
    tokens.add_argument("--token-k", type=int, default=256, help="FAISS hits per caption token (tokens)")
    tokens.add_argument(
        "--query-tokens", type=int, default=8, help="caption tokens searched, highest keep weight (0: all)"
    )
    parser.add_argument("--output-json", help="also write the results to this JSON file")
    _add_model_options(parser)
    return parser


# ------------------------------------------------------------------------------------ explain / demo


def add_explain_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `explain` sub-command to `subparsers` (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "explain",
        help="write figures that explain how a model aligns a caption with an image",
        description="Writes PNG figures (kept patches, per-word maps, region prompts, word keep weights, "
        "score by level) and summary.json into --output-dir.",
    )
    parser.add_argument("model", help="saved model directory or Hub repo id")
    parser.add_argument("--text", required=True, help="the caption to explain")
    parser.add_argument("--image", help="image file (models with a vision tower; optional picture for boxes)")
    parser.add_argument("--regions", help=".npy [N, D] region features (region-feature models)")
    parser.add_argument("--boxes", help=".npy [N, 4] region boxes x0, y0, x1, y1 in pixels (with --regions)")
    parser.add_argument("--output-dir", default="explain", help="where the figures go (default: ./explain)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.set_defaults(func=lazy_runner("granalign.viz.cli_viz:run_explain"))
    return parser


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command to `subparsers`."""
    parser = subparsers.add_parser(
        "demo",
        help="serve the web demo (caption ranking with explanations, text-to-image search)",
        description="Serves a Gradio app on HOST:PORT (local only by default; no share links).",
    )
    parser.add_argument("model", help="saved model directory or Hub repo id (a model with a vision tower)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--gallery-size", type=int, default=12, help="built-in scenes in the search gallery")
    parser.add_argument(
        "--index",
        help="search this image index (from `granalign index`, same MODEL) instead of built-in scenes",
    )
    parser.add_argument(
        "--image-root", help="folder the index's item ids (image paths) are relative to (default: as stored)"
    )
    parser.add_argument("--mode", default="two-stage", choices=MODES, help="index search mode")
    parser.add_argument(
        "--shortlist",
        type=int,
        default=DEFAULT_SHORTLIST,
        help=f"two-stage shortlist size (default {DEFAULT_SHORTLIST})",
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.set_defaults(func=lazy_runner("granalign.viz.cli_viz:run_demo"))
    return parser


# -------------------------------------------------------------------------------------------- export-onnx


def add_export_onnx_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `export-onnx` sub-command to `subparsers`."""
    parser = subparsers.add_parser(
        "export-onnx",
        help="export the image and text encoders to ONNX (checked against PyTorch with onnxruntime)",
        description="Writes encode_image.onnx and encode_text.onnx (unit global embeddings; dynamic batch, "
        "caption length and region count), the processor files and granalign_onnx.json into --output, then "
        "runs both with onnxruntime and compares them with PyTorch. Needs pip install 'granalign[onnx]'.",
    )
    parser.add_argument("model", help="saved model directory or Hub repo id")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the ONNX files to")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of MODEL")
    parser.add_argument(
        "--fine-grained",
        action="store_true",
        help="also output GRM's token and region parts (tokens, keep_weights, region_tokens, ...)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest allowed abs difference between onnxruntime and PyTorch outputs (default 1e-4)",
    )
    return parser


def parse_key_values(items: Sequence[str], option: str) -> dict[str, Any]:
    """`["k=v", ...]` of a repeatable `option` (e.g. `--dataset-arg`) → `{k: YAML value of v}`."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{option} {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out
