"""`granalign explain` and `granalign demo`: the runners for the main command line (their sub-parsers
live in the light `granalign.cli_parsers`, re-exported here).

    granalign explain MODEL --image scene.png --text "a red circle left of a blue square" [--output-dir DIR]
    granalign explain MODEL --regions feats.npy [--boxes boxes.npy] [--image scene.png] --text "..."
    granalign demo MODEL [--host 127.0.0.1] [--port 7860] [--index gallery.safetensors [--image-root DIR]]

MODEL is a saved model directory (with its processor) or a Hub repo id (`granalign.hub.loading`).
matplotlib and gradio are imported only when a command runs. User errors raise `ValueError` /
`FileNotFoundError` naming the bad value (the main CLI prints them and exits with status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..cli_parsers import add_demo_parser, add_explain_parser
from ..hub.loading import load_model_and_processor

__all__ = [
    "add_demo_parser",
    "add_explain_parser",
    "load_model_and_processor",
    "run_demo",
    "run_explain",
]


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
