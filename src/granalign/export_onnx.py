"""ONNX export of a GRM model's two encoders: `granalign export-onnx MODEL --output DIR`.

    granalign export-onnx runs/tiny/final --output onnx/ [--fine-grained] [--opset 18] [--atol 1e-4]

writes into DIR:

* `encode_image.onnx`: `pixel_values` `[batch, 3, H, W]` (a region-feature model: `region_features`
  `[batch, regions, D]` and `region_mask` `[batch, regions]`) → `image_embeds` `[batch, d]`, the unit
  global image embedding (`model.get_image_features(...).pooler_output`);
* `encode_text.onnx`: `input_ids`, `attention_mask` `[batch, length]` (int64) → `text_embeds` `[batch, d]`
  (`model.get_text_features(...).pooler_output`);
* the processor's files (`processor.save_pretrained`): `transformers`' `AutoImageProcessor` and
  `AutoTokenizer` load them from DIR without torch and give the encoders' inputs with
  `return_tensors="np"`, so a gallery can be encoded with onnxruntime alone;
* `granalign_onnx.json`: the inputs and outputs of each file, the caption length, the versions used and
  the largest difference to PyTorch measured by the check below.

Batch, caption length and region count are dynamic axes. With `--fine-grained` the encoders also output
GRM's multi-vector parts, named as in `GranAlignImageOutput` / `GranAlignTextOutput` (`tokens`,
`keep_weights`, `region_tokens`, `region_logvars`, `mixture_weights`, ...): what `model.score` combines
into the fine-grained score, which itself stays in PyTorch. The exporter is `torch.onnx.export(...,
dynamo=True)` (it needs `onnxscript`): the older TorchScript exporter traces these models into graphs
whose embeddings are wrong by ~0.2. After writing the files, each encoder is run with onnxruntime on new
inputs (another batch size and caption length than the export's) and compared with PyTorch; a difference
above `atol` is an error. Needs the `onnx` extra (`pip install 'granalign[onnx]'`); torch and onnx are
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_FILE",
    "ONNX_CONFIG",
    "TEXT_FILE",
    "export_onnx",
    "run_export_onnx",
    "verify_onnx",
]

IMAGE_FILE, TEXT_FILE, ONNX_CONFIG = "encode_image.onnx", "encode_text.onnx", "granalign_onnx.json"
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
_EXPORT_CAPTIONS = ("a red circle", "two small dogs on a mat")
_CHECK_CAPTIONS = ("a photo", "a small green star above a blue cross", "the dog", "a cat")
_EXTRA = "pip install 'granalign[onnx]' (onnx, onnxruntime, onnxscript)"


def _require_onnx() -> None:
    """A clear error naming the extra when onnx, onnxscript or onnxruntime is missing."""
    import importlib.util

    missing = [
        name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ModuleNotFoundError(f"export-onnx needs {', '.join(missing)}: {_EXTRA}")


def _encoders(model: Any) -> tuple[Any, Any]:
    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self, outputs: Sequence[str]) -> None:
            super().__init__()
            self.model, self.outputs = model, tuple(outputs)

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            encoded = self.model.encode_image(pixel_values=pixel_values)
            return tuple(getattr(encoded, name) for name in self.outputs)

    class RegionEncoder(ImageEncoder):
        def forward(
            self, region_features: torch.Tensor, region_mask: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            encoded = self.model.encode_image(region_features=region_features, region_mask=region_mask)
            return tuple(getattr(encoded, name) for name in self.outputs)

    class TextEncoder(ImageEncoder):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            encoded = self.model.encode_text(input_ids=input_ids, attention_mask=attention_mask)
            return tuple(getattr(encoded, name) for name in self.outputs)

    return (ImageEncoder if model.vision_model is not None else RegionEncoder), TextEncoder


def _noise_images(count: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    return [
        Image.fromarray(generator.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(count)
    ]


def _image_inputs(model: Any, processor: Any, count: int, seed: int) -> dict[str, Any]:
    import torch

    if model.vision_model is not None:
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError("the model has a vision tower but no image processor was saved with it")
        return {"pixel_values": processor(images=_noise_images(count, seed))["pixel_values"].float()}
    generator = torch.Generator().manual_seed(seed)
    regions = 4 + count  # another region count for each batch size
    features = torch.randn(count, regions, model.config.region_feature_dim, generator=generator)
    mask = torch.ones(count, regions, dtype=torch.long)
    mask[-1, regions // 2 :] = 0  # a padded image
    return {"region_features": features, "region_mask": mask}


def _text_inputs(processor: Any, captions: Sequence[str]) -> dict[str, Any]:
    if processor is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError("exporting the text encoder needs the model's tokenizer (its processor files)")
    batch = processor(text=list(captions), padding="longest")
    return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}


def _output_names(encoded: Any, inputs: dict[str, Any], embedding: str, fine_grained: bool) -> list[str]:
    """The embedding, then (fine-grained) every other tensor the encoder returns that is not an input."""
    if not fine_grained:
        return [embedding]
    given = list(inputs.values())
    names = [name for name, value in encoded.items() if value is not None and name != embedding]
    return [embedding, *(name for name in names if not any(value is encoded[name] for value in given))]


def _dynamic_shapes(inputs: dict[str, Any]) -> dict[str, dict[int, str]]:
    axes = {"pixel_values": {0: "batch"}, "region_features": {0: "batch", 1: "regions"},
            "region_mask": {0: "batch", 1: "regions"}, "input_ids": {0: "batch", 1: "length"},
            "attention_mask": {0: "batch", 1: "length"}}  # fmt: skip
    return {name: axes[name] for name in inputs}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices (e.g. torchvision ops it skips registering), not its errors."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_one(module: Any, inputs: dict[str, Any], outputs: list[str], path: Path, opset: int) -> None:
    import warnings

    import torch

    with _quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), tuple(inputs.values()), dynamo=True, input_names=list(inputs), output_names=outputs,
            dynamic_shapes=_dynamic_shapes(inputs), opset_version=opset, verbose=False, optimize=True,
        )  # fmt: skip
    program.save(str(path))  # weights in the file, or beside it (`.data`) past the 2 GB protobuf limit


def _session(path: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: Any, processor: Any, output_dir: str | Path, atol: float = DEFAULT_ATOL
) -> dict[str, dict[str, float]]:
    """Run both ONNX encoders in `output_dir` with onnxruntime on new inputs (batches of 1 and 4, caption
    lengths other than the export's) and compare each output with PyTorch. Returns the largest absolute
    difference per encoder and output; raises `ValueError` if one exceeds `atol`."""
    import numpy as np
    import torch

    directory = Path(output_dir)
    config = json.loads((directory / ONNX_CONFIG).read_text(encoding="utf-8"))
    diffs: dict[str, dict[str, float]] = {}
    for kind in ("image", "text"):
        spec = config["encoders"][kind]
        session = _session(directory / spec["file"])
        diffs[kind] = dict.fromkeys(spec["outputs"], 0.0)
        for count in (1, len(_CHECK_CAPTIONS)):
            if kind == "image":
                inputs = _image_inputs(model, processor, count, seed=10 + count)
                with torch.no_grad():
                    reference = model.encode_image(**inputs)
            else:
                inputs = _text_inputs(processor, _CHECK_CAPTIONS[:count])
                with torch.no_grad():
                    reference = model.encode_text(**inputs)
            got = session.run(list(spec["outputs"]), {name: value.numpy() for name, value in inputs.items()})
            for name, value in zip(spec["outputs"], got, strict=True):
                expected = reference[name].float().numpy()
                if value.shape != expected.shape:
                    raise ValueError(
                        f"{spec['file']}: {name} has shape {value.shape}, PyTorch {expected.shape}"
                    )
                diff = float(np.abs(value.astype(np.float64) - expected).max()) if value.size else 0.0
                diffs[kind][name] = max(diffs[kind][name], diff)
    worst = max(((diff, kind, name) for kind, values in diffs.items() for name, diff in values.items()))
    if worst[0] > atol:
        raise ValueError(
            f"the ONNX {worst[1]} encoder differs from PyTorch by {worst[0]:.3g} in {worst[2]} "
            f"(more than atol={atol:g}); all differences: {diffs}"
        )
    return diffs


def export_onnx(
    model: Any,
    processor: Any,
    output_dir: str | Path,
    *,
    fine_grained: bool = False,
    opset: int = DEFAULT_OPSET,
    atol: float | None = DEFAULT_ATOL,
    source: str | None = None,
) -> dict[str, Any]:
    """Export `model`'s image and text encoders to `output_dir` (see the module docstring) with the
    processor files and `granalign_onnx.json`, then check them against PyTorch (`verify_onnx`; skipped
    with `atol=None`). The model is exported on CPU in float32. Returns the written config."""
    import torch

    from . import __version__

    _require_onnx()
    import onnx

    model = model.to("cpu", torch.float32).eval()
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    image_module, text_module = _encoders(model)
    image_inputs = _image_inputs(model, processor, 2, seed=0)
    text_inputs = _text_inputs(processor, _EXPORT_CAPTIONS)
    with torch.no_grad():
        image_encoded, text_encoded = model.encode_image(**image_inputs), model.encode_text(**text_inputs)
    encoders = {}
    for kind, module, inputs, encoded, embedding, file in (
        ("image", image_module, image_inputs, image_encoded, "image_embeds", IMAGE_FILE),
        ("text", text_module, text_inputs, text_encoded, "text_embeds", TEXT_FILE),
    ):
        outputs = _output_names(encoded, inputs, embedding, fine_grained)
        _export_one(module(outputs), inputs, outputs, directory / file, opset)
        shapes = _dynamic_shapes(inputs)
        encoders[kind] = {
            "file": file,
            "inputs": {
                name: [shapes[name].get(axis, size) for axis, size in enumerate(value.shape)]
                for name, value in inputs.items()
            },
            "outputs": outputs,
        }
    if processor is not None:
        processor.save_pretrained(directory)
    config = {
        "format": "granalign-onnx",
        "source_model": source,
        "embed_dim": int(image_encoded.image_embeds.shape[-1]),
        "max_length": getattr(processor, "max_length", None),
        "fine_grained": fine_grained,
        "encoders": encoders,
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": {"granalign": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
    }
    (directory / ONNX_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if atol is not None:
        config["max_abs_diff"] = verify_onnx(model, processor, directory, atol)
        (directory / ONNX_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def run_export_onnx(args: argparse.Namespace) -> int:
    """Run `granalign export-onnx`; returns the exit status."""
    from .hub.loading import load_model_and_processor

    if args.atol <= 0:
        raise ValueError(f"--atol must be > 0, got {args.atol}")
    try:
        _require_onnx()  # before loading the model
    except ModuleNotFoundError as error:
        print(f"granalign export-onnx: error: {error}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(
        args.model, "cpu", revision=args.revision, require_processor=False
    )
    config = export_onnx(model, processor, args.output, fine_grained=args.fine_grained, opset=args.opset,
                         atol=args.atol, source=args.model)  # fmt: skip
    for kind in ("image", "text"):
        spec = config["encoders"][kind]
        worst = max(config["max_abs_diff"][kind].values())
        print(f"wrote {Path(args.output) / spec['file']}: {', '.join(spec['inputs'])} -> "
              f"{', '.join(spec['outputs'])} (onnxruntime vs PyTorch: max abs diff {worst:.2g})")  # fmt: skip
    print(f"wrote {Path(args.output) / ONNX_CONFIG} and the processor files")
    return 0
