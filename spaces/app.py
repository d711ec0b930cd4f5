"""Hugging Face Space entry point: the granalign demo for one model.

Set the model with the `GRANALIGN_MODEL` environment variable (a Space variable): a Hub repo id such as
`user/granalign-vit-f30k`, or a local model directory. Locally:

    GRANALIGN_MODEL=runs/tiny/final python spaces/app.py      # serves on 127.0.0.1:7860

granalign itself: the installed package when there is one; else (a Space, whose requirements.txt holds
only granalign's dependencies) the wheel pushed beside the model with `granalign push --with-wheel`, which
is downloaded from the model repo and unpacked under `$HF_HOME/granalign/wheels` (`ensure_granalign`).

To search your own images instead of the built-in scenes, point `GRANALIGN_INDEX` at an image index that
`granalign index` built with the same model: a file of the model repo (`gallery.safetensors`), a file in
another Hub repo (`hf://datasets/user/my-gallery/gallery.safetensors`; `@revision` after the repo name
pins one), or a local file (e.g. committed to the Space). A Hub index's images are downloaded with it: its
item ids are paths in that repo, under the repo folder `GRANALIGN_IMAGE_ROOT` (default the repo root). For
a local index, `GRANALIGN_IMAGE_ROOT` is the folder its ids are relative to (default the app's working
directory). Only files under that root are served: absolute ids, ids with `..` and symlinks leading out are
refused. All Hub downloads go through `huggingface_hub` (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` apply).

On a Space (where `SPACE_ID` is set) it serves on 0.0.0.0, as Spaces expect; `GRADIO_SERVER_NAME` and
`GRADIO_SERVER_PORT` override the address.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

MODEL_VARIABLE = "GRANALIGN_MODEL"
INDEX_VARIABLE = "GRANALIGN_INDEX"
IMAGE_ROOT_VARIABLE = "GRANALIGN_IMAGE_ROOT"
# what `granalign push --with-wheel` uploads beside the model
WHEEL_NAME = re.compile(r"^granalign-(?P<version>[A-Za-z0-9_.+!]+)-py3-none-any\.whl$")


def ensure_granalign(model: str) -> str:
    """Make `granalign` importable; returns where it comes from.

    The installed package when there is one. Else the granalign wheel in the model's Hub repo (the newest
    version, if several) is downloaded, unpacked (a pure-Python wheel is the package's files) into
    `$HF_HOME/granalign/wheels/<wheel>-<sha256>` and put first on `sys.path`.
    """
    try:
        if importlib.util.find_spec("granalign") is not None:
            return "installed"
    except ModuleNotFoundError:  # an import hook hides it
        pass
    install = "install granalign (pip install 'granalign[demo]')"
    if os.path.isdir(model):
        raise RuntimeError(f"granalign is not installed and {model!r} is a local directory: {install}")
    from huggingface_hub import HfApi, constants, hf_hub_download
    from packaging.version import InvalidVersion, Version

    def version(name: str) -> tuple[int, Version]:
        try:
            return 1, Version(WHEEL_NAME.match(name)["version"])
        except InvalidVersion:  # not a PEP 440 version: after every valid one
            return 0, Version("0")

    wheels = [name for name in HfApi().list_repo_files(model) if WHEEL_NAME.match(name)]
    if not wheels:
        raise RuntimeError(
            f"granalign is not installed and the model repo {model!r} has no granalign wheel: push one "
            f"with `granalign push MODEL_DIR --repo-id {model} --with-wheel`, or {install}"
        )
    name = max(wheels, key=version)
    wheel = Path(hf_hub_download(model, name))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    target = Path(constants.HF_HOME) / "granalign" / "wheels" / f"{name[: -len('.whl')]}-{digest}"
    if not (target / "granalign" / "__init__.py").is_file():
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        with zipfile.ZipFile(wheel) as archive:
            members = archive.namelist()
            unsafe = [m for m in members if PurePosixPath(m).is_absolute() or ".." in PurePosixPath(m).parts]
            if unsafe or "granalign/__init__.py" not in members:
                raise RuntimeError(
                    f"{name} in {model!r} is not a granalign wheel ({unsafe[:3] or 'no package'})"
                )
            archive.extractall(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return f"{name} from {model}"


def create_app() -> gr.Blocks:
    """Load the model named by `GRANALIGN_MODEL` (and the index `GRANALIGN_INDEX`, if set); build the app."""
    name = os.environ.get(MODEL_VARIABLE, "").strip()
    if not name:
        raise ValueError(
            f"set the {MODEL_VARIABLE} environment variable to a Hub repo id or a saved model directory"
        )
    source = ensure_granalign(name)
    from granalign import __version__
    from granalign.hub.loading import load_model_and_processor
    from granalign.viz.demo import build_demo

    print(f"granalign {__version__} ({source}); model {name}", flush=True)
    model, processor = load_model_and_processor(name, os.environ.get("GRANALIGN_DEVICE") or None)
    gallery_size = int(os.environ.get("GRANALIGN_GALLERY_SIZE", "12"))
    search = None
    index = os.environ.get(INDEX_VARIABLE, "").strip()
    if index:  # refuses an index built by another model, and missing images, before serving
        from granalign.hub.hub_index import locate_index
        from granalign.viz.index_search import IndexImageSearch

        index_file, root = locate_index(index, name, os.environ.get(IMAGE_ROOT_VARIABLE, "").strip() or None)
        # a public Space serves only files under its image root (for a local index, by default its own folder)
        search = IndexImageSearch(model, processor, index_file, image_root=root or os.getcwd())
        print(f"searching {index}: {search.index!r}", flush=True)
    return build_demo(
        model, processor, search=search, gallery_size=gallery_size, title=f"GranAlign demo: {name}"
    )


def main() -> None:
    """Build the app and serve it until stopped."""
    default_host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    host = os.environ.get("GRADIO_SERVER_NAME", default_host)
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    app = create_app()
    from granalign.viz.demo import launch_demo

    launch_demo(app, host=host, port=port, block=True)


if __name__ == "__main__":
    main()
