"""Shared pieces of the benchmarks: synthetic encoder outputs, a scoring-only model, timing, memory.

The workload is shaped like Flickr30K test with ViT-Base-224 tokens: 1,000 images x 5,000 captions,
197 image tokens (all real), K = 5 region tokens, captions padded to 32 tokens (real lengths 8..32),
d = 512. `--scale` shrinks the image and caption counts by the same factor.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from granalign import GranAlignConfig, GranAlignImageOutput, GranAlignModel, GranAlignTextOutput

FLICKR_IMAGES, FLICKR_CAPTIONS = 1000, 5000


@dataclass(frozen=True)
class Shape:
    images: int = FLICKR_IMAGES
    captions: int = FLICKR_CAPTIONS
    image_tokens: int = 197
    regions: int = 5
    caption_tokens: int = 32
    dim: int = 512

    def scaled(self, factor: float) -> Shape:
        return Shape(
            max(1, round(self.images * factor)),
            max(1, round(self.captions * factor)),
            self.image_tokens,
            self.regions,
            self.caption_tokens,
            self.dim,
        )

    def kernel_flops(
        self, images: int | None = None, captions: int | None = None, caption_tokens: float | None = None
    ) -> float:
        """Matmul FLOPs of the scores: 2·(d+2) per token pair, token level + region level, with
        `caption_tokens` tokens per caption (default: the padded length; pass the mean real length to count
        only the useful work)."""
        n = self.images if images is None else images
        m = self.captions if captions is None else captions
        length = self.caption_tokens if caption_tokens is None else caption_tokens
        return 2.0 * (self.dim + 2) * n * m * length * (self.image_tokens + self.regions)


def scoring_model(dim: int = 512) -> GranAlignModel:
    """A GRM model whose `score` works on d-dimensional cached features (its towers are never run)."""
    text = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 100}  # fmt: skip
    config = GranAlignConfig(region_feature_dim=16, embed_dim=dim, num_regions=5, text_config=text)
    return GranAlignModel(config).eval()


def synthetic_images(shape: Shape, count: int | None = None, seed: int = 0) -> GranAlignImageOutput:
    """Encoder-like image outputs `[N, L_v, d]` with keep weights, region tokens and unit embeddings."""
    n = shape.images if count is None else count
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, shape.image_tokens, shape.dim, generator=generator)
    keep = torch.rand(n, shape.image_tokens, generator=generator)
    regions = torch.randn(n, shape.regions, shape.dim, generator=generator)
    embeds = torch.nn.functional.normalize((tokens * keep[..., None]).mean(1), dim=-1)
    mask = torch.ones(n, shape.image_tokens, dtype=torch.long)
    return GranAlignImageOutput(tokens=tokens, token_mask=mask, keep_weights=keep, region_tokens=regions,
                                image_embeds=embeds)  # fmt: skip


def synthetic_texts(shape: Shape, count: int | None = None, seed: int = 1) -> GranAlignTextOutput:
    """Caption outputs padded to `caption_tokens`, real lengths uniform in [8, caption_tokens]."""
    m = shape.captions if count is None else count
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, shape.caption_tokens, shape.dim, generator=generator)
    lengths = torch.randint(min(8, shape.caption_tokens), shape.caption_tokens + 1, (m,), generator=generator)
    mask = (torch.arange(shape.caption_tokens)[None, :] < lengths[:, None]).long()
    keep = torch.rand(m, shape.caption_tokens, generator=generator) * mask
    embeds = torch.nn.functional.normalize((tokens * keep[..., None]).mean(1), dim=-1)
    return GranAlignTextOutput(tokens=tokens, token_mask=mask, keep_weights=keep, text_embeds=embeds)


def timed(func: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `func` over `repeats` runs after `warmup` runs, and all the times."""
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_rate(rows: int, inner: int, cols: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of a plain dense `[rows, inner] @ [inner, cols]` matmul in `dtype` (median)."""
    a = torch.randn(rows, inner).to(dtype)
    b = torch.randn(cols, inner).to(dtype)
    seconds, _ = timed(lambda: a @ b.t(), repeats)
    return 2.0 * rows * inner * cols / seconds


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    """CPU model name, thread count and load average, for the printed report."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, load average {load}"
