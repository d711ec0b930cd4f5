"""Hugging Face Space entry point: the granalign demo for one model.

Set the model with the `GRANALIGN_MODEL` environment variable (a Space variable): a Hub repo id such as
`user/granalign-vit-f30k`, or a local model directory. The Space's requirements need
`granalign[demo]` (and the model's towers). Locally:

    GRANALIGN_MODEL=runs/tiny/final python spaces/app.py      # serves on 127.0.0.1:7860

To search your own images instead of the built-in scenes, point `GRANALIGN_INDEX` at an image index that
`granalign index` built with the same model (e.g. a file committed to the Space) and, unless its item ids
are paths relative to the app's working directory, `GRANALIGN_IMAGE_ROOT` at the folder holding the images.
Only files under that root are served: absolute ids, ids with `..` and symlinks leading out are refused.

On a Space (where `SPACE_ID` is set) it serves on 0.0.0.0, as Spaces expect; `GRADIO_SERVER_NAME` and
`GRADIO_SERVER_PORT` override the address.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from granalign.viz.cli_viz import load_model_and_processor
from granalign.viz.demo import build_demo, launch_demo
from granalign.viz.index_search import IndexImageSearch

MODEL_VARIABLE = "GRANALIGN_MODEL"
INDEX_VARIABLE = "GRANALIGN_INDEX"
IMAGE_ROOT_VARIABLE = "GRANALIGN_IMAGE_ROOT"


def create_app() -> gr.Blocks:
    """Load the model named by `GRANALIGN_MODEL` (and the index `GRANALIGN_INDEX`, if set); build the app."""
    name = os.environ.get(MODEL_VARIABLE, "").strip()
    if not name:
        raise ValueError(
            f"set the {MODEL_VARIABLE} environment variable to a Hub repo id or a saved model directory"
        )
    model, processor = load_model_and_processor(name, os.environ.get("GRANALIGN_DEVICE") or None)
    gallery_size = int(os.environ.get("GRANALIGN_GALLERY_SIZE", "12"))
    search = None
    index = os.environ.get(INDEX_VARIABLE, "").strip()
    if index:  # refuses an index built by another model, and missing images, before serving
        # a public Space serves only files under its image root (by default its own folder)
        root = os.environ.get(IMAGE_ROOT_VARIABLE, "").strip() or os.getcwd()
        search = IndexImageSearch(model, processor, index, image_root=root)
    return build_demo(
        model, processor, search=search, gallery_size=gallery_size, title=f"GranAlign demo: {name}"
    )


def main() -> None:
    """Build the app and serve it until stopped."""
    default_host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    host = os.environ.get("GRADIO_SERVER_NAME", default_host)
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    launch_demo(create_app(), host=host, port=port, block=True)


if __name__ == "__main__":
    main()
