"""The chunked fine-grained score equals a plain per-pair reference, whatever the chunking or batching."""

from __future__ import annotations

import pytest
import torch
from reference_scoring import reference_levels
from tiny_configs import image_inputs, text_inputs, tiny_model

from granalign import concat_image_outputs, concat_text_outputs


@pytest.fixture(scope="module", params=["vit", None])
def encoded(request):
    model = tiny_model(request.param, seed=1).eval()
    with torch.no_grad():
        images = model.encode_image(**image_inputs(request.param, batch=5, seed=2))
        texts = model.encode_text(**text_inputs(batch=7, seed=3))
    return model, images, texts, request.param


def test_levels_equal_the_per_pair_reference(encoded):
    model, images, texts, _ = encoded
    fast = model.level_scores(images, texts)
    torch.testing.assert_close(fast, reference_levels(images, texts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("image_chunk", "text_chunk"), [(1, 1), (2, 3), (5, 7), (4, 100)])
def test_chunking_does_not_change_scores(encoded, image_chunk, text_chunk):
    model, images, texts, _ = encoded
    whole = model.score(images, texts, image_chunk_size=100, text_chunk_size=100)
    chunked = model.score(images, texts, image_chunk_size=image_chunk, text_chunk_size=text_chunk)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_score_combines_levels_with_the_configured_weights(encoded):
    model, images, texts, _ = encoded
    a, b, c = model.config.level_weights
    levels = reference_levels(images, texts)
    torch.testing.assert_close(
        model.score(images, texts), a * levels[0] + b * levels[1] + c * levels[2], atol=1e-5, rtol=1e-5
    )


def test_forward_logits_equal_score(encoded):
    model, _, _, vision = encoded
    pixels, captions = image_inputs(vision, batch=5, seed=2), text_inputs(batch=7, seed=3)
    with torch.no_grad():
        output = model(**pixels, **captions)
        expected = model.score(model.encode_image(**pixels), model.encode_text(**captions))
    # logits are the scores times the temperature scale, as CLIP's
    logits = expected * model.temperature_scale()
    torch.testing.assert_close(output.logits_per_image, logits)
    torch.testing.assert_close(output.logits_per_text, logits.t())
    assert output.level_scores.shape == (3, 5, 7)


def test_scores_do_not_depend_on_batch_composition(encoded):
    model, images, texts, vision = encoded
    pixels, captions = image_inputs(vision, batch=5, seed=2), text_inputs(batch=7, seed=3)
    with torch.no_grad():
        singles_img = [
            model.encode_image(**{k: v[i : i + 1] for k, v in pixels.items()}) for i in (3, 0, 4, 1, 2)
        ]
        singles_txt = [
            model.encode_text(**{k: v[j : j + 1] for k, v in captions.items()}) for j in range(6, -1, -1)
        ]
    reordered = model.score(concat_image_outputs(singles_img), concat_text_outputs(singles_txt))
    expected = model.score(images, texts)[[3, 0, 4, 1, 2]][:, list(range(6, -1, -1))]
    torch.testing.assert_close(reordered, expected, atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_padding_length(encoded):
    model, images, _, vision = encoded
    captions = text_inputs(batch=7, seed=3)
    padded = {k: torch.nn.functional.pad(v, (0, 6)) for k, v in captions.items()}
    with torch.no_grad():
        longer = model.encode_text(**padded)
        if vision is None:
            regions = image_inputs(None, batch=5, seed=2)
            regions = {
                k: torch.nn.functional.pad(v, (0, 0, 0, 4) if v.dim() == 3 else (0, 4))
                for k, v in regions.items()
            }
            images = model.encode_image(**regions)
    torch.testing.assert_close(model.score(images, longer), model.score(*encoded[1:3]), atol=1e-5, rtol=1e-5)


def test_reduced_precision_scores_stay_close(encoded):
    model, images, texts, _ = encoded
    full = model.score(images, texts)
    half = model.score(images, texts, dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=2e-2, rtol=2e-2)


def test_invalid_chunk_sizes_are_rejected(encoded):
    model, images, texts, _ = encoded
    with pytest.raises(ValueError, match="chunk sizes must be >= 1, got 0 and 8"):
        model.score(images, texts, image_chunk_size=0, text_chunk_size=8)


def test_peak_pairwise_tensor_is_bounded_by_the_chunk_sizes(encoded, monkeypatch):
    import granalign.scoring_granalign as scoring

    model, images, texts, _ = encoded
    sizes = []
    original = scoring._pairwise_cosine

    def recording(image_tokens, text_tokens):
        result = original(image_tokens, text_tokens)
        sizes.append(result.shape)
        return result

    monkeypatch.setattr(scoring, "_pairwise_cosine", recording)
    model.score(images, texts, image_chunk_size=2, text_chunk_size=3)
    length_v, length_t = images.tokens.shape[1], texts.tokens.shape[1]
    assert sizes and all(shape[0] <= 2 and shape[2] <= 3 for shape in sizes)
    assert max(s[0] * s[1] * s[2] * s[3] for s in sizes) <= 2 * length_v * 3 * length_t


def test_length_sorted_chunks_skip_padding_and_keep_every_score(encoded, monkeypatch):
    import granalign.scoring_granalign as scoring

    model, images, texts, _ = encoded
    widths = []
    original = scoring._pairwise_cosine

    def recording(image_tokens, text_tokens):
        widths.append(text_tokens.shape[1])
        return original(image_tokens, text_tokens)

    monkeypatch.setattr(scoring, "_pairwise_cosine", recording)
    chunked = model.level_scores(images, texts, image_chunk_size=2, text_chunk_size=2)
    torch.testing.assert_close(chunked, reference_levels(images, texts), atol=1e-5, rtol=1e-5)
    used = sorted(int(row.nonzero().max()) + 1 for row in texts.token_mask)  # 6, 7, 8, 9 in text_inputs
    expected = [max(used[j : j + 2]) for j in range(0, len(used), 2)]
    assert sorted(set(widths)) == sorted(set(expected)) and min(widths) < texts.tokens.shape[1]


def test_left_padded_captions_score_like_right_padded_ones(encoded):
    model, images, texts, _ = encoded
    shifts = [int(texts.token_mask.shape[1] - n) for n in texts.token_mask.sum(1)]
    left = type(texts)(**{name: torch.stack([row.roll(shift, dims=0) for row, shift in zip(value, shifts, strict=True)])
                          if name in ("tokens", "token_mask", "keep_weights") else value
                          for name, value in texts.items()})  # fmt: skip
    assert left.token_mask[:, 0].min() == 0  # really padded on the left
    expected = model.score(images, texts, image_chunk_size=2, text_chunk_size=2)
    torch.testing.assert_close(model.score(images, left, image_chunk_size=2, text_chunk_size=2), expected)


def test_training_path_of_the_token_levels_has_the_reference_values_and_gradients():
    from granalign.scoring_granalign import (
        _token_levels,
        _token_levels_with_sparse_backward,
        code_images,
        code_texts,
    )

    generator = torch.Generator().manual_seed(0)
    image_tokens = torch.randn(3, 7, 8, generator=generator, requires_grad=True)
    text_tokens = torch.randn(4, 5, 8, generator=generator, requires_grad=True)
    image_keep = torch.rand(3, 7, generator=generator).requires_grad_()
    text_keep = torch.rand(4, 5, generator=generator).requires_grad_()
    image_mask = torch.ones(3, 7, dtype=torch.long)
    image_mask[1, 5:] = 0  # padded regions
    text_mask = torch.ones(4, 5, dtype=torch.long)
    text_mask[2, 3:] = 0
    text_mask[3, 1:] = 0
    weights = torch.randn(2, 3, 4, generator=generator)  # a random loss on both levels

    def run(levels):
        images = code_images(image_tokens, image_mask, image_keep, None)
        texts = code_texts(text_tokens, text_mask, text_keep)
        original, key = levels(images, texts, 0.1)
        loss = (torch.stack([original, key]) * weights).sum()
        grads = torch.autograd.grad(loss, (image_tokens, text_tokens, image_keep, text_keep))
        return torch.stack([original, key]).detach(), grads

    reference_values, reference_grads = run(_token_levels)
    values, grads = run(_token_levels_with_sparse_backward)
    torch.testing.assert_close(values, reference_values)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_select_rows_drops_only_the_columns_no_selected_item_uses(encoded):
    from granalign.outputs_granalign import select_rows
    from granalign.scoring_granalign import token_widths

    model, images, texts, _ = encoded
    widths = [int(row.nonzero().max()) + 1 for row in texts.token_mask]  # 9, 8, 7, 6, 9, 8, 7
    assert token_widths(texts.token_mask).tolist() == widths
    rows = torch.tensor(sorted(range(len(widths)), key=widths.__getitem__)[:3])  # the three shortest
    part = select_rows(texts, rows)
    assert part.tokens.shape[1] == max(widths[r] for r in rows) < texts.tokens.shape[1]
    torch.testing.assert_close(model.score(images, part), model.score(images, texts)[:, rows])
    view = select_rows(images, slice(1, 4), names=("tokens", "token_mask"))
    assert set(view.keys()) == {"tokens", "token_mask"}
    assert view.tokens.data_ptr() == images.tokens[1:4].data_ptr()  # a slice copies nothing
