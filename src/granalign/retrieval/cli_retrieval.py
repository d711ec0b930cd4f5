"""The `granalign index` and `granalign search` commands (their parsers: `granalign.cli_parsers`).

    granalign index MODEL OUTPUT (--images PATH... [--skip-bad-images] | --dataset SOURCE [--split test]
                                  [--captions] | --captions-file FILE | --regions FILE) [--dtype float16]
                                  [--append]
    granalign search INDEX MODEL (--text CAPTION... | --image PATH... | --regions FILE) [-k 10]
                                  [--mode two-stage|exhaustive] [--shortlist N]
                                  [--shortlist-by regions|embeddings] [--output-json FILE]

A multi-vector token index (`granalign.retrieval.TokenIndex`, a directory) for large image galleries:

    granalign index MODEL OUTPUT_DIR --token-index (--images PATH... | --dataset SOURCE) [--codec int8]
                    [--first-stage-tokens 32] [--rerank-tokens N] [--token-factory IVF1024,PQ64x4fs]
                    [--centroids-only] [--append | --overwrite]
    granalign search OUTPUT_DIR MODEL --text CAPTION... [--first-stage centroids|tokens] [--nprobe 4]
                    [--ndocs 256] [--refine 0] [--token-k 256] [--query-tokens 8] [--shortlist 20]

MODEL is a saved model directory or Hub id (with `--revision`). User errors raise `ValueError` /
`OSError`, which `granalign.cli.main` prints as one line (exit status 2): an image file that cannot be read
is one, naming the file, unless `--skip-bad-images` leaves such files out of the index and lists them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from granalign.cli_parsers import add_index_parser, add_search_parser

__all__ = ["add_index_parser", "add_search_parser", "run_index", "run_search"]


# ------------------------------------------------------------------------------------------ helpers


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from granalign.hub.loading import load_model_and_processor

    return load_model_and_processor(args.model, args.device, revision=args.revision, require_processor=False)


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


def _encode_image_files(args: argparse.Namespace, model: Any, processor: Any) -> tuple[Any, list[str]]:
    """Outputs and ids of the `--images` files; unreadable ones are an error, or skipped and listed."""
    from granalign.retrieval import encode

    files = encode.list_image_files(args.images)
    skip = getattr(args, "skip_bad_images", False)
    try:
        outputs, encoded, skipped = encode.encode_image_files(
            model, processor, files, args.batch_size, not args.no_progress, skip_bad=skip
        )
    except encode.UnreadableImageError as error:
        raise ValueError(f"{error} (pass --skip-bad-images to leave such files out)") from None
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} image files that cannot be read:")
        for _, reason in skipped:
            print(f"  {reason}")
    return outputs, [str(f) for f in encoded]


def _encode_source(args: argparse.Namespace, model: Any, processor: Any) -> tuple[Any, list[str], Any]:
    """Outputs, ids and caption texts (or None) of the gallery the index arguments name."""
    from granalign.retrieval import encode

    progress, batch = not args.no_progress, args.batch_size
    if args.images:
        return (*_encode_image_files(args, model, _need_processor(processor, "--images")), None)
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


# ------------------------------------------------------------------------------------------ commands


def _auto_factory(num_vectors: int) -> str:
    """`IVF<n>,Flat` with n a power of two giving >= 39 training vectors per centroid (FAISS's minimum),
    at most 1,024."""
    nlist = 1
    while nlist * 2 <= 1024 and nlist * 2 * 39 <= num_vectors:
        nlist *= 2
    return f"IVF{nlist},Flat"


def _run_token_index(args: argparse.Namespace) -> int:
    """`granalign index --token-index`: encode images (the shared encode path) into a `TokenIndex`."""
    import shutil

    from granalign.retrieval.multivector import TokenIndex, select_tokens

    if args.captions or args.captions_file:
        raise ValueError("--token-index indexes images (--images or --dataset), not captions")
    for name in ("first_stage_tokens", "rerank_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 0 (0: all tokens), got {getattr(args, name)}"
            )
    output = Path(args.output)
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
    model, processor = _load_model(args)
    index = TokenIndex.open(output, model=model) if args.append else None
    outputs, ids, _ = _encode_source(args, model, processor)
    if index is None:
        if args.overwrite and output.exists():
            shutil.rmtree(output)
        first_stage = args.first_stage_tokens or None
        factory = args.token_factory
        if factory == "auto":
            factory = _auto_factory(
                len(select_tokens(outputs.token_mask, outputs.keep_weights, first_stage)[0])
            )
        regions = getattr(outputs, "region_tokens", None)
        index = TokenIndex.create(
            output, model, dim=outputs.tokens.shape[-1], num_regions=0 if regions is None else regions.shape[1],
            codec=args.codec, first_stage_tokens=first_stage, rerank_tokens=args.rerank_tokens or None,
            faiss_factory=factory, token_codes=not args.centroids_only,
        )  # fmt: skip
    index.add(outputs, ids).save()
    sizes = index.nbytes()
    print(f"wrote {output}: {index!r}; {sum(sizes.values()) / max(len(index), 1) / 1024:.1f} KiB per image")
    return 0


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
