"""The `granalign index` and `granalign search` commands (their parsers: `granalign.cli_parsers`).

    granalign index MODEL OUTPUT (--images PATH... [--skip-bad-images] | --dataset SOURCE [--split test]
                                  [--captions] | --captions-file FILE | --regions FILE) [--dtype float16]
                                  [--append]
    granalign search INDEX MODEL (--text CAPTION... | --image PATH... | --regions FILE) [-k 10]
                                  [--mode two-stage|exhaustive] [--shortlist N]
                                  [--shortlist-by regions|embeddings] [--output-json FILE]

A multi-vector token index (`granalign.retrieval.TokenIndex`, a directory) for large image galleries:

    granalign index MODEL OUTPUT_DIR --token-index (--images PATH... | --dataset SOURCE | --regions FILE)
                    [--codec int8] [--first-stage-tokens 32] [--rerank-tokens N]
                    [--token-factory IVF1024,PQ64x4fs] [--centroids auto|ivf|IMI2x<b>] [--centroids-only]
                    [--chunk-size 1024] [--append | --overwrite]
    granalign search OUTPUT_DIR MODEL --text CAPTION... [--first-stage centroids|tokens] [--nprobe 4]
                    [--ndocs 256] [--refine 0] [--token-k 256] [--query-tokens 8] [--shortlist 20]

The token index build streams: the gallery (image files, dataset rows or region arrays) is encoded and
added `--chunk-size` images at a time, so memory holds one chunk's outputs (and the FAISS training buffer),
never the gallery's. It gives the files a one-chunk build gives (with a chunk size that is a multiple of
`--batch-size` the batches are the same). The gallery size is known up front: `TokenIndex.create` gets it
as `expected_items` (`--centroids auto` resolves PLAID's cell count from it), and `--token-factory auto`
estimates the first-stage vector count as gallery size × the first chunk's first-stage tokens per image
(exact for a fixed token count per image). A new index is built in `OUTPUT_DIR.partial` and moved into
place when complete; a failed `--append` truncates the files back, so an error leaves OUTPUT_DIR as it was.

Under `accelerate launch --num_processes N -m granalign.cli index ... --token-index` each process encodes
its `shard_range` of the gallery in chunks and `build_token_index_distributed` merges the shards (the main
process trains the first stage on its first chunks; only it prints). `--append` runs in one process.

MODEL is a saved model directory or Hub id (with `--revision`). User errors raise `ValueError` /
`OSError`, which `granalign.cli.main` prints as one line (exit status 2): an image file that cannot be read
is one, naming the file, unless `--skip-bad-images` leaves such files out of the index and lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from granalign.cli_parsers import add_index_parser, add_search_parser

__all__ = ["add_index_parser", "add_search_parser", "run_index", "run_search"]


# ------------------------------------------------------------------------------------------ helpers


def _load_model(args: argparse.Namespace, device: str | None = None) -> tuple[Any, Any]:
    """The model and processor of MODEL, on `--device` (else `device`, else cuda if available)."""
    from granalign.hub.loading import load_model_and_processor

    return load_model_and_processor(
        args.model, args.device or device, revision=args.revision, require_processor=False
    )


def _need_processor(processor: Any, what: str) -> Any:
    if processor is None:
        raise ValueError(f"{what} needs the model's processor, but none was saved with the model")
    return processor


def _load_split(args: argparse.Namespace) -> Any:
    """The `--split` of `--dataset` built with `--dataset-arg`s, as a training recipe's data would be."""
    from granalign.cli_parsers import parse_key_values
    from granalign.data.schema import canonical_split
    from granalign.training.builders import load_recipe_dataset
    from granalign.training.recipe import DataRecipe

    kwargs = parse_key_values(args.dataset_arg or [], "--dataset-arg")
    dataset = load_recipe_dataset(DataRecipe(source=args.dataset, args=kwargs))
    split = canonical_split(args.split)
    if split not in dataset:
        raise ValueError(f"--split: the dataset has no split {args.split!r}; it has {sorted(dataset)}")
    return dataset[split]


def _read_captions(path: str) -> tuple[list[str], list[str]]:
    """Captions of a text file (blank lines skipped) and their ids (`id<TAB>caption`, else `line-N`)."""
    ids, captions = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item, tab, caption = line.partition("\t")
        ids.append(item.strip() if tab else f"line-{number}")
        captions.append(caption.strip() if tab else line.strip())
    if not captions:
        raise ValueError(f"{path!r} holds no captions")
    return ids, captions


def _read_regions(path: str) -> tuple[list[np.ndarray], list[str]]:
    """Per-image `[N_i, D]` region arrays and ids from a .npy `[N, R, D]` or .npz (`features`, `mask`, `ids`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no region file at {path!r}")
    data = np.load(path, allow_pickle=False)
    mask = ids = None
    if isinstance(data, np.ndarray):
        features = data
    else:
        with data:
            if "features" not in data:
                raise ValueError(f"{path!r} must hold a 'features' array [N, R, D]; it has {sorted(data)}")
            features = data["features"]
            mask = data.get("mask")
            ids = [str(v) for v in data["ids"]] if "ids" in data else None
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError(f"region features must be [N, R, D], got shape {features.shape} in {path!r}")
    if mask is not None and mask.shape != features.shape[:2]:
        raise ValueError(f"'mask' must be [N, R] = {list(features.shape[:2])}, got {list(mask.shape)}")
    arrays = [f if mask is None else f[mask[i] > 0] for i, f in enumerate(features)]
    if ids is not None and len(ids) != len(arrays):
        raise ValueError(f"'ids' has {len(ids)} entries for {len(arrays)} images in {path!r}")
    return arrays, ids or [str(i) for i in range(len(arrays))]


def _encode_image_files(
    args: argparse.Namespace, model: Any, processor: Any, files: list[Path], progress: bool, allow_empty: bool
) -> tuple[Any, list[str], list[tuple[Path, str]]]:
    """Outputs (None: every file skipped, with `allow_empty`), ids and skipped `(file, reason)` of image
    `files`; an unreadable one is an error naming `--skip-bad-images`, or skipped with it."""
    from granalign.retrieval import encode

    skip = getattr(args, "skip_bad_images", False)
    try:
        outputs, encoded, skipped = encode.encode_image_files(
            model, processor, files, args.batch_size, progress, skip_bad=skip, allow_empty=allow_empty
        )
    except encode.UnreadableImageError as error:
        raise ValueError(f"{error} (pass --skip-bad-images to leave such files out)") from None
    return outputs, [str(f) for f in encoded], skipped


def _report_skipped(skipped: list[tuple[Path, str]], total: int) -> None:
    """List the image files `--skip-bad-images` left out (of `total`)."""
    if skipped:
        print(f"skipped {len(skipped)} of {total} image files that cannot be read:")
        for _, reason in skipped:
            print(f"  {reason}")


def _encode_source(args: argparse.Namespace, model: Any, processor: Any) -> tuple[Any, list[str], Any]:
    """Outputs, ids and caption texts (or None) of the gallery the index arguments name."""
    from granalign.retrieval import encode

    progress, batch = not args.no_progress, args.batch_size
    if args.images:
        files = encode.list_image_files(args.images)
        processor = _need_processor(processor, "--images")
        outputs, ids, skipped = _encode_image_files(args, model, processor, files, progress, False)
        _report_skipped(skipped, len(files))
        return outputs, ids, None
    if args.captions_file:
        ids, captions = _read_captions(args.captions_file)
        outputs = encode.encode_captions(
            model, _need_processor(processor, "captions"), captions, batch, progress
        )
        return outputs, ids, captions
    if args.regions:
        arrays, ids = _read_regions(args.regions)
        return encode.encode_regions(model, arrays, batch, progress), ids, None
    split = _load_split(args)
    if args.captions:
        ids, captions = [], []
        image_ids = split["image_id"] if "image_id" in split.column_names else range(len(split))
        for image_id, row_captions in zip(image_ids, split["captions"], strict=True):
            ids.extend(f"{image_id}#{k}" for k in range(len(row_captions)))
            captions.extend(row_captions)
        outputs = encode.encode_captions(
            model, _need_processor(processor, "captions"), captions, batch, progress
        )
        return outputs, ids, captions
    outputs, ids = encode.encode_dataset_images(model, processor, split, batch, progress)
    return outputs, ids, None


# -------------------------------------------------------------------------------------- token index

#: environment variables holding the number of launched processes (torchrun / accelerate, MPI)
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclasses.dataclass
class _Gallery:
    """The images of a token index: `size` rows; `encode(rows)` gives `(ids, outputs)` of a block of them
    (outputs None when `--skip-bad-images` left out every file of the block, `skipped` lists them)."""

    size: int
    encode: Callable[[range], tuple[list[str], Any]]
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


def _token_gallery(args: argparse.Namespace, model: Any, processor: Any, progress: bool) -> _Gallery:
    """The `--images`, `--regions` or `--dataset` gallery of `--token-index`, encoded block by block."""
    from granalign.retrieval import encode

    batch = args.batch_size
    if args.images:
        files = encode.list_image_files(args.images)
        processor = _need_processor(processor, "--images")
        skipped: list[tuple[Path, str]] = []

        def encode_files(rows: range) -> tuple[list[str], Any]:
            block = files[rows.start : rows.stop]
            outputs, ids, bad = _encode_image_files(args, model, processor, block, progress, True)
            skipped.extend(bad)
            return ids, outputs

        return _Gallery(len(files), encode_files, skipped)
    if args.regions:
        arrays, region_ids = _read_regions(args.regions)

        def encode_regions(rows: range) -> tuple[list[str], Any]:
            block = arrays[rows.start : rows.stop]
            return region_ids[rows.start : rows.stop], encode.encode_regions(model, block, batch, progress)

        return _Gallery(len(arrays), encode_regions)
    split = _load_split(args)

    def encode_rows(rows: range) -> tuple[list[str], Any]:
        outputs, ids = encode.encode_dataset_images(model, processor, split, batch, progress, rows=rows)
        return ids, outputs

    return _Gallery(len(split), encode_rows)


def _chunks(gallery: _Gallery, rows: range, size: int, progress: bool) -> Iterator[tuple[list[str], Any]]:
    """`(ids, outputs)` of the gallery's `rows`, encoded `size` rows at a time: the one chunking loop of
    single-process and sharded builds (a block whose files were all skipped yields nothing)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc="index", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(rows.start, rows.stop, size):
            block = range(start, min(start + size, rows.stop))
            chunk = gallery.encode(block)
            bar.update(len(block))
            if chunk[1] is not None:
                yield chunk
            del chunk  # not held while the next block is encoded


def _settings_and_chunks(
    args: argparse.Namespace, chunks: Iterator[tuple[list[str], Any]], gallery: _Gallery
) -> tuple[dict[str, Any], Iterator[tuple[list[str], Any]]]:
    """`TokenIndex.create` settings of a new index from the first chunk (`_index_settings`), and the
    chunks again, the first included; an error when there is none."""
    first = next(chunks, None)
    if first is None:
        raise _nothing_to_index(gallery)
    return _index_settings(args, first[1], gallery.size), _prepended(first, chunks)


def _nothing_to_index(gallery: _Gallery) -> ValueError:
    """The error of a gallery (or shard) that gave no images to add."""
    if gallery.skipped:
        return ValueError(
            f"none of the {len(gallery.skipped)} image files can be read, e.g. {gallery.skipped[0][1]}; "
            "nothing to index"
        )
    return ValueError("nothing to index: the gallery holds no images")


def _prepended(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    """`first`, then `rest`, without holding on to `first` once it is taken (multivector's `_popped`)."""
    from granalign.retrieval.multivector import _popped

    return itertools.chain(_popped([first]), rest)


def _auto_factory(num_vectors: int) -> str:
    """`IVF<n>,Flat` with n a power of two giving >= 39 training vectors per centroid (FAISS's minimum),
    at most 1,024."""
    nlist = 1
    while nlist * 2 <= 1024 and nlist * 2 * 39 <= num_vectors:
        nlist *= 2
    return f"IVF{nlist},Flat"


def _estimated_vectors(first: Any, first_stage_tokens: int | None, expected_items: int) -> int:
    """The gallery's first-stage vector count from its first chunk: `expected_items` times the chunk's
    first-stage tokens per image (exact when every image has as many, e.g. patch tokens >=
    `--first-stage-tokens`, and no file is skipped)."""
    from granalign.retrieval.multivector import select_tokens

    count = len(select_tokens(first.token_mask, first.keep_weights, first_stage_tokens)[0])
    return count * expected_items // first.tokens.shape[0]


def _index_settings(args: argparse.Namespace, first: Any, expected_items: int) -> dict[str, Any]:
    """`TokenIndex.create` settings of a new index: the options, the token size and region count of the
    first chunk, and the gallery size (`expected_items`, which `--centroids auto` resolves from)."""
    first_stage = args.first_stage_tokens or None
    factory = args.token_factory
    if factory == "auto":
        factory = _auto_factory(_estimated_vectors(first, first_stage, expected_items))
    regions = getattr(first, "region_tokens", None)
    return dict(
        dim=int(first.tokens.shape[-1]), num_regions=0 if regions is None else int(regions.shape[1]),
        codec=args.codec, first_stage_tokens=first_stage, rerank_tokens=args.rerank_tokens or None,
        faiss_factory=factory, token_codes=not args.centroids_only, centroids=args.centroids,
        expected_items=expected_items,
    )  # fmt: skip


def _build(args: argparse.Namespace, model: Any, gallery: _Gallery, path: Path, progress: bool) -> Any:
    """A new token index at `path`, in this process, the gallery added chunk by chunk; saved."""
    from granalign.retrieval.multivector import TokenIndex

    chunks = _chunks(gallery, range(gallery.size), args.chunk_size, progress)
    settings, chunks = _settings_and_chunks(args, chunks, gallery)
    return TokenIndex.create(path, model, **settings).add_chunks(chunks).save()


def _append(args: argparse.Namespace, model: Any, gallery: _Gallery, output: Path, progress: bool) -> Any:
    """The index at `output` with the gallery added chunk by chunk, saved; a failure truncates its files
    back (`_rolled_back_on_error`)."""
    from granalign.retrieval.multivector import TokenIndex

    index = TokenIndex.open(output, model=model)
    before = len(index)
    with _rolled_back_on_error(output):
        index.add_chunks(_chunks(gallery, range(gallery.size), args.chunk_size, progress))
        if len(index) == before:
            raise _nothing_to_index(gallery)
    return index.save()


def _build_sharded(
    args: argparse.Namespace, model: Any, gallery: _Gallery, path: Path, state: Any, progress: bool
) -> Any:
    """A new token index at `path` built by every process of `state`, each encoding its `shard_range` in
    chunks (`build_token_index_distributed`); the main process's first chunk sets the settings. Returns
    the merged index on the main process, None elsewhere."""
    from accelerate.utils import broadcast_object_list

    from granalign.retrieval.multivector import build_token_index_distributed, shard_range

    rows = shard_range(gallery.size, state.process_index, state.num_processes)
    chunks = _chunks(gallery, rows, args.chunk_size, progress)
    settings: list[Any] = [None]
    if state.is_main_process:
        settings[0], chunks = _settings_and_chunks(args, chunks, gallery)
    broadcast_object_list(settings)
    return build_token_index_distributed(state, lambda rank, world: chunks, path, model=model, **settings[0])


@contextlib.contextmanager
def _process_state(args: argparse.Namespace) -> Iterator[Any]:
    """accelerate's `PartialState` when several processes were launched (`accelerate launch
    --num_processes N`), else None; an error when accelerate does not see the launched processes.

    The process group is destroyed when the block ends, however it ends: left to the interpreter's exit,
    gloo's worker threads are torn down in no set order and a process can abort ("terminate called
    without an active exception") after its work is done, failing the launch."""
    launched = max(int(os.environ.get(name, "1")) for name in _WORLD_SIZE_VARIABLES)
    if launched <= 1:
        yield None
        return
    try:
        from accelerate import PartialState
    except ImportError:
        raise ValueError(
            f"{launched} processes were launched, but a sharded --token-index build needs accelerate: "
            "pip install accelerate"
        ) from None
    import torch

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    try:
        if state.num_processes != launched:
            raise ValueError(
                f"{launched} processes were launched, but accelerate runs {state.num_processes}: launch "
                "the sharded build with `accelerate launch --num_processes N -m granalign.cli index ...`"
            )
        yield state
    finally:
        state.destroy_process_group()


def _check_token_options(args: argparse.Namespace) -> None:
    """The `--token-index` option errors, found before the model is loaded."""
    from granalign.retrieval.multivector import resolve_centroids

    if args.captions or args.captions_file:
        raise ValueError("--token-index indexes images (--images, --dataset or --regions), not captions")
    for name in ("first_stage_tokens", "rerank_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 0 (0: all tokens), got {getattr(args, name)}"
            )
    if getattr(args, "skip_bad_images", False) and not args.images:
        raise ValueError("--skip-bad-images leaves out unreadable --images files: use it with --images")
    if args.chunk_size < 1:
        raise ValueError(
            f"--chunk-size must be >= 1 (images encoded and added at a time), got {args.chunk_size}"
        )
    try:
        resolve_centroids(args.centroids, None, None, 1)  # TokenIndex.create's check of the spec
    except ValueError as error:
        raise ValueError(f"--centroids: {error}") from None


def _check_token_output(args: argparse.Namespace, output: Path) -> None:
    """OUTPUT must be a token index with `--append` / `--overwrite`, else absent or an empty folder."""
    exists = (output / "meta.json").is_file()
    if output.exists() and not exists and any(output.iterdir()):
        raise ValueError(
            f"{str(output)!r} is a non-empty folder without a token index: choose another OUTPUT"
        )
    if output.is_file():
        raise ValueError(f"{str(output)!r} is a file; a token index is a directory")
    if exists and not (args.append or args.overwrite):
        raise ValueError(f"{str(output)!r} holds a token index: pass --append to add to it or --overwrite")
    if args.append and not exists:
        raise FileNotFoundError(f"--append: no token index at {str(output)!r} to add to")


@contextlib.contextmanager
def _staged(output: Path, main: bool) -> Iterator[Path]:
    """A sibling folder `<OUTPUT>.partial` to build a new index in: moved to `output` (replacing the index
    `--overwrite` replaces) when the block succeeds, removed when it fails, so an error leaves `output` as
    it was. Only the main process moves and removes."""
    staging = output.resolve().with_name(f"{output.resolve().name}.partial")
    if staging.exists():
        raise FileExistsError(
            f"{str(staging)!r} exists (left by an interrupted build?): remove it, then index again"
        )
    try:
        yield staging
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main:
        if output.exists():
            shutil.rmtree(output)  # a token index (--overwrite) or an empty folder (_check_token_output)
        os.replace(staging, output)


@contextlib.contextmanager
def _rolled_back_on_error(path: Path) -> Iterator[None]:
    """Undo appends to the files of the index at `path` when the block fails: files are truncated to
    their sizes before it, new ones removed (`TokenIndex.add` only appends; `save` writes the rest)."""
    sizes = {file: file.stat().st_size for file in path.iterdir() if file.is_file()}
    try:
        yield
    except BaseException:
        for file in path.iterdir():
            if file not in sizes and file.is_file():
                file.unlink()
            elif file in sizes and file.stat().st_size != sizes[file]:
                os.truncate(file, sizes[file])
        raise


def _summary(index: Any) -> str:
    """One line on a built token index: size, settings, bytes per image."""
    meta, sizes = index.meta, index.nbytes()
    return (
        f"{len(index)} images, codec {meta['codec']}, first stage {meta['faiss_factory']!r} over "
        f"{meta['first_stage_tokens'] or 'all'} tokens/image, centroids {index.quantizer_spec or 'none'}; "
        f"{sum(sizes.values()) / max(len(index), 1) / 1024:.1f} KiB per image"
    )


def _run_token_index(args: argparse.Namespace) -> int:
    """`granalign index --token-index`: stream the gallery into a `TokenIndex` chunk by chunk (the shared
    encode path), in one process or sharded over the processes of `accelerate launch`."""
    _check_token_options(args)
    output = Path(args.output)
    _check_token_output(args, output)
    with _process_state(args) as state:
        return _token_index_in(args, output, state)


def _token_index_in(args: argparse.Namespace, output: Path, state: Any) -> int:
    """`_run_token_index` in the processes of `state` (None: this one alone)."""
    if state is not None and args.append:
        raise ValueError(
            f"--append adds to an index in one process, not {state.num_processes}: run it without "
            "`accelerate launch` (a sharded build writes a new index)"
        )
    main = state is None or state.is_main_process
    progress = not args.no_progress and main
    model, processor = _load_model(args, None if state is None else str(state.device))
    gallery = _token_gallery(args, model, processor, progress)
    if args.append:
        summary = _summary(_append(args, model, gallery, output, progress))
    else:
        with _staged(output, main) as path:
            if state is None:
                index = _build(args, model, gallery, path, progress)
            else:
                index = _build_sharded(args, model, gallery, path, state, progress)
            summary = _summary(index) if main else ""
    skipped = gallery.skipped
    if state is not None:
        from accelerate.utils import gather_object

        skipped = gather_object(skipped)
    if main:
        _report_skipped(skipped, gallery.size)
        print(f"wrote {output}: {summary}")
    return 0


# ------------------------------------------------------------------------------------------ commands


def _is_token_index(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "meta.json").is_file()


def run_index(args: argparse.Namespace) -> int:
    """Encode the gallery the arguments name and write (or extend) the index file."""
    from granalign.retrieval.index import GalleryIndex

    if getattr(args, "token_index", False):
        return _run_token_index(args)
    output = Path(args.output)
    if output.exists() and not (args.append or args.overwrite):
        raise ValueError(f"{str(output)!r} exists: pass --append to add to it or --overwrite to replace it")
    if args.append and not output.exists():
        raise FileNotFoundError(f"--append: no index at {str(output)!r} to add to")
    if args.captions and not args.dataset:
        raise ValueError("--captions indexes a dataset's captions: use it with --dataset")
    if getattr(args, "skip_bad_images", False) and not args.images:
        raise ValueError("--skip-bad-images leaves out unreadable --images files: use it with --images")
    model, processor = _load_model(args)
    existing = GalleryIndex.load(output, model=model) if args.append else None
    outputs, ids, texts = _encode_source(args, model, processor)
    if existing is not None:
        index = existing.add(outputs, ids, texts)
        if args.dtype != index.dtype_name:
            print(f"note: --dtype {args.dtype} ignored; the index stores {index.dtype_name}")
    else:
        index = GalleryIndex.build(model, outputs, ids, texts, dtype=args.dtype)
    index.save(output)
    print(f"wrote {output}: {index!r}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Search an index with caption or image queries and print (and optionally save) the top-k."""
    from granalign.retrieval import encode
    from granalign.retrieval.index import GalleryIndex
    from granalign.retrieval.search import search

    if args.top_k < 1 or (args.shortlist is not None and args.shortlist < 1):
        raise ValueError(f"-k and --shortlist must be >= 1, got {args.top_k} and {args.shortlist}")
    token_index = _is_token_index(args.index)
    if token_index and not args.text:
        raise ValueError(f"{args.index!r} is a token index of images: search it with --text captions")
    if token_index and args.mode != "two-stage":
        raise ValueError(
            "a token index is searched in two stages (first stage, then the exact re-rank of --shortlist "
            f"candidates); --mode {args.mode} is not available for it"
        )
    model, processor = _load_model(args)
    if token_index:
        from granalign.retrieval.multivector import TokenIndex

        index = TokenIndex.open(args.index, model=model)
    else:
        index = GalleryIndex.load(args.index, model=model)
    progress, batch = not args.no_progress, args.batch_size
    if args.text:
        labels = list(args.text)
        queries = encode.encode_captions(model, _need_processor(processor, "--text"), labels, batch, progress)
    elif args.image:
        labels = [str(p) for p in encode.list_image_files(args.image)]
        queries = encode.encode_images(model, _need_processor(processor, "--image"), labels, batch, progress)
    else:
        arrays, labels = _read_regions(args.regions)
        queries = encode.encode_regions(model, arrays, batch, progress)
    if token_index:
        result = index.search(
            model, queries, k=args.top_k, candidates=args.shortlist or 20, token_k=args.token_k,
            query_tokens=args.query_tokens or None, mode=args.first_stage, nprobe=args.nprobe,
            ndocs=args.ndocs, refine=args.refine,
        )  # fmt: skip
        records = result.to_records()
    else:
        result = search(
            model, index, queries, k=args.top_k, mode=args.mode, shortlist=args.shortlist,
            shortlist_by=args.shortlist_by, backend=args.backend, faiss_factory=args.faiss_factory,
            progress=progress,
        )  # fmt: skip
        records = result.to_records(index)
    for label, hits in zip(labels, records, strict=True):
        print(f"query: {label}")
        for hit in hits:
            text = f"  {hit['text']}" if "text" in hit else ""
            print(f"  {hit['rank']:>3}  {hit['score']:8.4f}  {hit['id']}{text}")
    if args.output_json:
        payload = {
            "index": str(args.index),
            "mode": args.mode,
            "k": args.top_k,
            "queries": labels,
            "results": records,
        }
        Path(args.output_json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"wrote {args.output_json}")
    return 0
