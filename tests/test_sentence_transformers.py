"""sentence-transformers on a saved GRM checkpoint: `SentenceTransformer(saved_dir)` encodes captions and
images into GRM's global embeddings (`get_text_features` / `get_image_features` `.pooler_output`, unit
vectors), the way it wraps CLIP. Fine-grained GRM scores need the model itself (`model(**inputs)`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import IMAGE_SIZE, tiny_model, tiny_tokenizer
from transformers import ViTImageProcessorPil

from granalign import GranAlignProcessor

sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason="sentence-transformers is not installed (it is in granalign[dev])"
)

CAPTIONS = ["a red circle left of a blue square", "two dogs", "a small green star above a cross"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViT + BERT GRM checkpoint with its processor, as `save_model_dir` writes one."""
    directory = tmp_path_factory.mktemp("granalign-st")
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=16)
    model = tiny_model("vit").eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


def test_encode_gives_the_global_embeddings(saved):
    directory, model, processor = saved
    encoder = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
    texts = encoder.encode(CAPTIONS, convert_to_tensor=True)
    images = encoder.encode(_images(), convert_to_tensor=True)
    with torch.no_grad():
        expected_texts = model.get_text_features(**processor(text=CAPTIONS, padding="longest")).pooler_output
        expected_images = model.get_image_features(**processor(images=_images())).pooler_output
    torch.testing.assert_close(texts, expected_texts)
    torch.testing.assert_close(images, expected_images)
    similarity = encoder.similarity(images, texts)
    torch.testing.assert_close(similarity, expected_images @ expected_texts.T)
    dimension = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    assert dimension() == model.config.embed_dim  # read through projection_dim


def test_a_region_model_encodes_captions_and_names_what_images_need(tmp_path):
    directory = tmp_path / "regions"
    processor = GranAlignProcessor(tokenizer=tiny_tokenizer(tmp_path), max_length=12)
    model = tiny_model(None).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    encoder = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
    texts = encoder.encode(CAPTIONS, convert_to_tensor=True)
    with torch.no_grad():
        expected = model.get_text_features(**processor(text=CAPTIONS, padding="longest")).pooler_output
    torch.testing.assert_close(texts, expected)
    with pytest.raises(ValueError, match=r"no image processor.*precomputed region features"):
        encoder.encode(_images())
