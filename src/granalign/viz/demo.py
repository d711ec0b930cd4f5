"""The web demo (Gradio, the `demo` extra): rank captions for an image, explain the match, search images.

    demo = build_demo(model, processor)          # a gr.Blocks; tabs "Rank captions" and "Search images"
    launch_demo(demo, host="127.0.0.1", port=7860)

The model-side work lives in `DemoBackend` (plain Python, testable without a browser); the Gradio layer only
wires components to it. Analytics are off, nothing is shared, and the default theme's fonts are served by
the app itself, so the page renders without internet access.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .explain import compute_explanation, load_image
from .figures import draw_figures
from .scene_gallery import ImageSearch, SceneGallerySearch, example_scenes

__all__ = ["RANKING_HEADERS", "DemoBackend", "build_demo", "figure_to_image", "launch_demo"]

RANKING_HEADERS = ["rank", "caption", "score", "S_ori", "S_key", "S_unc"]
FIGURE_LABELS = {
    "levels": "score by level",
    "word_maps": "best-matching patches per word",
    "kept_patches": "kept patches (significance adapter)",
    "word_keep": "keep weight per word (granularity adapter)",
    "regions": "region prompts",
}
MAX_CAPTIONS = 32
MAX_UPLOAD_SIZE = "10mb"  # largest uploaded image the server accepts (gradio's max_file_size)


def figure_to_image(figure: Figure) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image."""
    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())


def parse_captions(text: str | None) -> list[str]:
    """One caption per non-empty line; errors when there is none or too many."""
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not captions:
        raise ValueError("no captions: type one caption per line")
    if len(captions) > MAX_CAPTIONS:
        raise ValueError(f"{len(captions)} captions; the demo ranks at most {MAX_CAPTIONS} at once")
    return captions


class DemoBackend:
    """Ranking and explanations for the demo, one model call at a time (a lock guards the model)."""

    def __init__(self, model: Any, processor: Any, lock: threading.Lock | None = None) -> None:
        if model.config.uses_region_features:
            raise ValueError(
                "the demo takes uploaded images, so it needs a model with a vision tower; this model takes "
                "precomputed region features (use `granalign explain --regions` for it)"
            )
        self.model, self.processor = model.eval(), processor
        self.lock = lock or threading.Lock()

    @torch.no_grad()
    def rank(self, image: Any, captions_text: str) -> list[list[Any]]:
        """Score every caption against the image → rows of `RANKING_HEADERS`, best first."""
        if image is None:
            raise ValueError("no image: upload one or pick an example")
        captions = parse_captions(captions_text)
        picture = load_image(image)
        device = next(self.model.parameters()).device
        pixels = self.processor(images=[picture])["pixel_values"].to(device=device, dtype=self.model.dtype)
        batch = self.processor(text=captions, padding="longest")
        with self.lock:
            image_out = self.model.encode_image(pixel_values=pixels)
            text_out = self.model.encode_text(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
            levels = self.model.level_scores(image_out, text_out)[:, 0].float().cpu()  # [3, M]
        weights = torch.tensor(self.model.config.level_weights, dtype=levels.dtype)
        scores = weights @ levels
        order = torch.argsort(scores, descending=True).tolist()
        return [
            [rank + 1, captions[i], round(float(scores[i]), 4), *(round(float(v), 4) for v in levels[:, i])]
            for rank, i in enumerate(order)
        ]

    def explain(self, image: Any, caption: str) -> list[tuple[Image.Image, str]]:
        """The explanation figures of one caption as `(image, label)` pairs for a gallery."""
        with self.lock:
            explanation = compute_explanation(self.model, self.processor, caption, image=load_image(image))
        figures = draw_figures(explanation)
        return [(figure_to_image(figures[name]), label) for name, label in FIGURE_LABELS.items()]


def _user_error(error: Exception) -> gr.Error:
    return gr.Error(str(error))


def build_demo(
    model: Any,
    processor: Any,
    search: ImageSearch | None = None,
    num_examples: int = 3,
    gallery_size: int = 12,
    title: str = "GranAlign: fine-grained image-text alignment (GRM)",
) -> gr.Blocks:
    """The demo app: a caption-ranking tab with explanations and a text → image search tab.

    Args:
        model, processor: a `GranAlignModel` with a vision tower and its `GranAlignProcessor`.
        search: the search backend (`search(query, top_k) -> list[SearchHit]`, e.g. `IndexImageSearch`
            over a `granalign index` file; its `lock`, if any, also guards the ranking tab's model calls);
            by default the built-in scene gallery (`SceneGallerySearch`, `gallery_size` images).
        num_examples: built-in example scenes offered in the ranking tab.
    """
    backend = DemoBackend(model, processor, lock=getattr(search, "lock", None))
    if search is None:
        search = SceneGallerySearch(model, processor, num_images=gallery_size, lock=backend.lock)
    example_dir = Path(tempfile.mkdtemp(prefix="granalign-demo-"))
    examples = []
    for scene in example_scenes(num_examples):
        path = example_dir / f"{scene.image_id}.png"
        scene.image.save(path)
        examples.append([str(path), "\n".join([*scene.captions[:3], scene.distractor])])

    def rank_and_explain(image: Any, captions_text: str):
        try:
            rows = backend.rank(image, captions_text)
            figures = backend.explain(image, rows[0][1])
        except (ValueError, OSError) as error:
            raise _user_error(error) from None
        best = f"**Best caption:** “{rows[0][1]}” (score {rows[0][2]:.4f})"
        choices = gr.Dropdown(choices=[row[1] for row in rows], value=rows[0][1], interactive=True)
        return rows, best, choices, figures

    def explain_choice(image: Any, caption: str | None):
        if not caption:
            raise gr.Error("rank some captions first, then pick one to explain")
        try:
            return backend.explain(image, caption)
        except (ValueError, OSError) as error:
            raise _user_error(error) from None

    def run_search(query: str, top_k: float):
        try:
            hits = search.search(query, int(top_k))
        except (ValueError, OSError) as error:
            raise _user_error(error) from None
        return [(hit.image, f"{hit.image_id}  score {hit.score:.4f}") for hit in hits]

    with gr.Blocks(title="GranAlign demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nScores are the GRM similarity `a·S_ori + b·S_key + c·S_unc`.")
        with gr.Tab("Rank captions"):
            with gr.Row():
                with gr.Column(scale=1):
                    image_input = gr.Image(
                        type="pil", format="png", label="Image", elem_id="rank-image", height=300
                    )
                    captions_input = gr.Textbox(
                        lines=5, label="Captions (one per line)", elem_id="rank-captions",
                        placeholder="a red circle left of a blue square",
                    )  # fmt: skip
                    rank_button = gr.Button("Rank and explain", variant="primary", elem_id="rank-button")
                    gr.Examples(
                        examples=examples, inputs=[image_input, captions_input], label="Built-in scenes"
                    )
                with gr.Column(scale=2):
                    best_text = gr.Markdown(elem_id="rank-best")
                    ranking = gr.Dataframe(
                        headers=RANKING_HEADERS, label="Ranking", interactive=False, elem_id="ranking", wrap=True,
                        column_widths=["7%", "53%", "10%", "10%", "10%", "10%"],
                    )  # fmt: skip
                    chosen = gr.Dropdown(
                        choices=[], label="Explain caption", interactive=True, elem_id="explain-choice"
                    )
                    figures = gr.Gallery(
                        label="Explanation", columns=1, format="png", object_fit="contain", height="auto",
                        elem_id="explain-figures",
                    )  # fmt: skip
            rank_button.click(
                rank_and_explain, [image_input, captions_input], [ranking, best_text, chosen, figures]
            )
            chosen.input(explain_choice, [image_input, chosen], [figures])
        with gr.Tab("Search images"):
            with gr.Row():
                query = gr.Textbox(label="Caption to search for", elem_id="search-query", scale=3)
                top_k = gr.Slider(1, 12, value=4, step=1, label="results", scale=1)
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            results = gr.Gallery(
                label="Best-matching images", columns=4, format="png", elem_id="search-results"
            )
            search_button.click(run_search, [query, top_k], [results])
            query.submit(run_search, [query, top_k], [results])
    return demo


def launch_demo(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    quiet: bool = False,
    max_upload_size: str = MAX_UPLOAD_SIZE,
) -> str:
    """Serve the demo on `host:port` (no share link, no server-side rendering); returns the local URL.

    Uploads larger than `max_upload_size` (e.g. "10mb") are refused by the server. With `block=False`
    it returns at once and serves in the background (`demo.close()` stops it).
    """
    _, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        ssr_mode=False,
        quiet=quiet,
        show_error=True,
        max_file_size=max_upload_size,
    )
    if block:
        demo.block_thread()
    return local_url
