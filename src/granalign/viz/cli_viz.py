"""`granalign explain` and `granalign demo`: sub-parsers and runners for the main command line.

    granalign explain MODEL --image scene.png --text "a red circle left of a blue square" [--output-dir DIR]
    granalign explain MODEL --regions feats.npy [--boxes boxes.npy] [--image scene.png] --text "..."
    granalign demo MODEL [--host 127.0.0.1] [--port 7860] [--index gallery.safetensors [--image-root DIR]]

MODEL is a saved model directory (with its processor) or a Hub repo id. Importing this module is cheap:
matplotlib and gradio are imported only when a command runs. User errors raise `ValueError` /
`FileNotFoundError` naming the bad value (the main CLI prints them and exits with status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "add_demo_parser",
    "add_explain_parser",
    "load_model_and_processor",
    "run_demo",
    "run_explain",
]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def load_model_and_processor(name_or_path: str, device: str | None = None) -> tuple[Any, Any]:
    """Load a `GranAlignModel` (eval mode, on `device`) and its `GranAlignProcessor`.

    A local directory must hold `config.json` and safetensors weights; anything else that is not a path
    is taken as a Hub repo id.
    """
    import torch

    from ..modeling_granalign import GranAlignModel
    from ..processing_granalign import GranAlignProcessor

    if _looks_like_path(name_or_path):
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path!r} is not a saved GranAlign model (no config.json)")
        if not any((directory / name).is_file() for name in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"model directory {name_or_path!r} has no weights (expected {' or '.join(_WEIGHT_FILES)})"
            )
        name_or_path = str(directory)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GranAlignModel.from_pretrained(name_or_path).to(device).eval()
    processor = GranAlignProcessor.from_pretrained(name_or_path)
    return model, processor


def _missing_extra(command: str, error: ModuleNotFoundError, module: str, extra: str) -> int:
    """Report a missing optional dependency (re-raise any other import error)."""
    if (error.name or "").split(".")[0] != module:
        raise error
    print(
        f"granalign {command}: error: needs {module}; install it with: pip install 'granalign[{extra}]'",
        file=sys.stderr,
    )
    return 2


def _load_array(path: str, label: str) -> Any:
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{label} file {path!r} does not exist")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {label} file {path!r} as a .npy array: {error}") from None


# ------------------------------------------------------------------------------------------- explain


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
    parser.set_defaults(func=run_explain)
    return parser


def run_explain(args: argparse.Namespace) -> int:
    """Run `granalign explain`; prints the written files and returns the exit status."""
    try:
        from . import figures  # noqa: F401  (matplotlib: the `viz` extra)
    except ModuleNotFoundError as error:
        return _missing_extra("explain", error, "matplotlib", "viz")
    from .explain import explain

    if not args.text.strip():
        raise ValueError(f"--text is empty ({args.text!r}); give the caption to explain")
    if args.boxes and not args.regions:
        raise ValueError("--boxes describes region features: pass --regions too")
    if args.image is None and args.regions is None:
        raise ValueError("pass --image (or --regions for a region-feature model)")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"image file {args.image!r} does not exist")
    features = _load_array(args.regions, "--regions") if args.regions else None
    boxes = _load_array(args.boxes, "--boxes") if args.boxes else None
    model, processor = load_model_and_processor(args.model, args.device)
    paths = explain(
        model,
        processor,
        args.text,
        args.output_dir,
        image=args.image,
        region_features=features,
        region_boxes=boxes,
    )
    for name, path in paths.items():
        print(f"{name:>13}: {path}")
    return 0


# ---------------------------------------------------------------------------------------------- demo


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
    parser.add_argument(
        "--mode", default="two-stage", choices=("two-stage", "exhaustive"), help="index search mode"
    )
    parser.add_argument("--shortlist", type=int, default=20, help="two-stage shortlist size (default 20)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run `granalign demo` until interrupted; returns the exit status."""
    try:
        from .demo import build_demo, launch_demo
    except ModuleNotFoundError as error:
        return _missing_extra("demo", error, "gradio", "demo")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.gallery_size < 1:
        raise ValueError(f"--gallery-size must be >= 1, got {args.gallery_size}")
    if args.shortlist < 1:
        raise ValueError(f"--shortlist must be >= 1, got {args.shortlist}")
    if args.image_root and not args.index:
        raise ValueError("--image-root locates the images of a gallery index: pass --index too")
    if args.image_root and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image-root {args.image_root!r} is not a folder")
    model, processor = load_model_and_processor(args.model, args.device)
    search = None
    if args.index:  # refuses an index another model built, and missing images, before serving
        from .index_search import IndexImageSearch

        search = IndexImageSearch(model, processor, args.index, image_root=args.image_root, mode=args.mode,
                                  shortlist=args.shortlist)  # fmt: skip
        print(f"searching {args.index}: {search.index!r}")
    app = build_demo(model, processor, search=search, gallery_size=args.gallery_size)
    print(f"serving the demo of {args.model} on http://{args.host}:{args.port} (Ctrl+C to stop)")
    try:
        launch_demo(app, host=args.host, port=args.port, block=True)
    except KeyboardInterrupt:
        app.close()
    return 0
