"""Processor for GranAlign: one object that turns captions and images (or precomputed region
features) into the tensors `GranAlignModel` takes.

This module travels next to a saved checkpoint (``register_for_auto_class``) and is imported with
``trust_remote_code=True`` where ``granalign`` is not installed: it imports only numpy, PIL, torch and
transformers.

Example:
    >>> from transformers import AutoImageProcessor, AutoTokenizer
    >>> processor = GranAlignProcessor(
    ...     AutoImageProcessor.from_pretrained("google/vit-base-patch16-224-in21k"),
    ...     AutoTokenizer.from_pretrained("bert-base-uncased"),
    ...     max_length=32,
    ... )
    >>> batch = processor(text=["a dog on a mat"], images=[pil_image])
    >>> batch["input_ids"].shape, batch["pixel_values"].shape
    (torch.Size([1, 32]), torch.Size([1, 3, 224, 224]))

    A model on precomputed region features has no vision tower; its processor has no image processor:

    >>> processor = GranAlignProcessor(tokenizer=tokenizer)
    >>> batch = processor(text=captions, regions=[feats_a, feats_b])   # [N_a, D], [N_b, D]
    >>> batch["region_features"].shape, batch["region_mask"].shape
    (torch.Size([2, N_max, D]), torch.Size([2, N_max]))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

__all__ = ["GranAlignProcessor"]

_TEXT_INPUT_NAMES = ["input_ids", "attention_mask"]
_IMAGE_INPUT_NAMES = ["pixel_values"]
_REGION_INPUT_NAMES = ["region_features", "region_mask", "region_boxes"]

_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_TENSOR_TYPES = ("pt", "np", None)
_CHANNEL_COUNTS = (1, 2, 3, 4)  # L, LA, RGB, RGBA
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255, 255)

ImageLike = Image.Image | np.ndarray | torch.Tensor
ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


# ----------------------------------------------------------------------------------------- text


def _caption_list(text: str | Sequence[str]) -> list[str]:
    """Validate captions and return them as a list (a single string becomes a batch of one)."""
    if isinstance(text, str):
        captions = [text]
    elif isinstance(text, (list, tuple)):
        captions = list(text)
        if not captions:
            raise ValueError("`text` is an empty list; expected at least one caption.")
    else:
        raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"text[{index}] is a {type(caption).__name__}; expected a string.")
        if not caption.strip():
            raise ValueError(
                f"text[{index}] is empty or whitespace-only ({caption!r}); every caption needs words."
            )
    return captions


# --------------------------------------------------------------------------------------- images


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detach a tensor to a CPU numpy array (half/bfloat16 widened to float32, which numpy can hold)."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def _image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """Split `images` into single images: one image, a list of images, or a 4-D `[B, ...]` batch."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(
            f"`images` is an array of shape {tuple(images.shape)}; expected one image [H, W], [H, W, C] or "
            "[C, H, W], or a batch [B, H, W, C] / [B, C, H, W]."
        )
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("`images` is an empty list; expected at least one image.")
        return list(images)
    raise TypeError(
        "`images` must be a PIL image, a numpy array, a torch tensor or a list of them, "
        f"got {type(images).__name__}."
    )


def _to_uint8(array: np.ndarray, index: int) -> np.ndarray:
    """Map pixel values to uint8: bool -> {0, 255}; 16-bit integers -> /257; floats in [0, 1] -> x255.

    Floats whose maximum is at most 1.1 are read as [0, 1] (small resampling overshoot is clipped),
    larger ones as [0, 255]. Negative values mean an already-normalised image and are rejected.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"image {index} has integer values in [{low}, {high}]; "
                "expected 8-bit [0, 255] or 16-bit [0, 65535]."
            )
        if array.dtype == np.uint16 or high > 255:
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"image {index} contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < -0.1 or high > 280.0:
            raise ValueError(
                f"image {index} has float values in [{low:.3g}, {high:.3g}]; expected raw pixels in "
                "[0, 1] or [0, 255] (pass un-normalised images: the image processor normalises them)."
            )
        scaled = array * 255.0 if high <= 1.1 else array
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    raise TypeError(f"image {index} has dtype {array.dtype}; expected an integer, boolean or floating dtype.")


def _array_to_pil(array: np.ndarray, index: int, channels_first: bool) -> Image.Image:
    """Turn a `[H, W]`, `[H, W, C]` or `[C, H, W]` array (C in 1..4) into a PIL image.

    A 3-D array is read as channels-first when `channels_first` is preferred (torch tensors) and its
    first dim is a channel count, else channels-last when its last dim is one (numpy), else the other.
    """
    shape = tuple(array.shape)
    if array.ndim not in (2, 3):
        raise ValueError(f"image {index} has shape {shape}; expected [H, W], [H, W, C] or [C, H, W].")
    if 0 in shape:
        raise ValueError(f"image {index} is empty: shape {shape}.")
    if array.ndim == 3:
        first, last = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
        if not (first or last):
            raise ValueError(
                f"image {index} has shape {shape}; a 3-D image needs 1, 2, 3 or 4 channels in its first "
                "or last dim (pass a batch of grayscale images as a list or as [B, H, W, 1])."
            )
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, index)))


def _pil_to_rgb(image: Image.Image, index: int) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit/float modes rescaled."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"image {index} is empty: size {width}x{height} (width x height).")
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # PIL's own conversion clips these to 255 instead of rescaling: go through numpy.
        return _pil_to_rgb(_array_to_pil(np.asarray(image), index, channels_first=False), index)
    if mode == "La":
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_rgb_image(image: Any, index: int) -> Image.Image:
    """One image of any supported type, mode and layout -> an RGB uint8 PIL image."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, index)
    if isinstance(image, torch.Tensor):
        return _pil_to_rgb(_array_to_pil(_tensor_to_numpy(image), index, channels_first=True), index)
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(image, index, channels_first=False), index)
    raise TypeError(
        f"image {index} is a {type(image).__name__}; expected a PIL image, numpy array or torch tensor."
    )


# -------------------------------------------------------------------------------------- regions


def _as_float32(value: Any, label: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested list to a float32 numpy array."""
    if isinstance(value, torch.Tensor):
        return _tensor_to_numpy(value).astype(np.float32, copy=False)
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise TypeError(f"{label} has dtype {value.dtype}; expected a numeric array.")
        return value.astype(np.float32, copy=False)
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label} is not a rectangular numeric array: {error}") from None
    raise TypeError(
        f"{label} is a {type(value).__name__}; expected a numpy array, torch tensor or nested list."
    )


def _region_list(value: ArrayLike, name: str) -> list[np.ndarray]:
    """Split `value` into per-image float32 `[N, D]` arrays: one `[N, D]`, a `[B, N, D]` batch or a list."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = _as_float32(value, f"`{name}`")
        if array.ndim == 2:
            arrays = [array]
        elif array.ndim == 3:
            arrays = list(array)
        else:
            raise ValueError(
                f"`{name}` has shape {tuple(array.shape)}; expected [N, D] for one image, or [B, N, D] or a "
                "list of [N, D] arrays for a batch."
            )
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` is an empty list; expected at least one [N, D] array.")
        arrays = [_as_float32(item, f"{name}[{index}]") for index, item in enumerate(value)]
    else:
        raise TypeError(
            f"`{name}` must be a numpy array, a torch tensor or a list of them, got {type(value).__name__}."
        )
    for index, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(f"{name}[{index}] has shape {tuple(array.shape)}; expected a 2-D array [N, D].")
        if 0 in array.shape:
            raise ValueError(
                f"{name}[{index}] has shape {tuple(array.shape)}; every image needs at least one "
                "region (N >= 1) and D >= 1."
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}[{index}] contains NaN or infinite values.")
    return arrays


def _pad_regions(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack `[N_i, D]` arrays into `[B, N_max, D]` (zero-padded) and a `[B, N_max]` int64 mask (1 = real)."""
    n_max = max(array.shape[0] for array in arrays)
    padded = np.zeros((len(arrays), n_max, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), n_max), dtype=np.int64)
    for row, array in enumerate(arrays):
        padded[row, : array.shape[0]] = array
        mask[row, : array.shape[0]] = 1
    return padded, mask


def _check_max_length(max_length: Any, tokenizer: Any) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the tokenizer's model_max_length={limit} "
            "(the text tower has no positions beyond it)."
        )
    return max_length


# ------------------------------------------------------------------------------------ processor


class GranAlignProcessor(ProcessorMixin):
    """Image processor (optional) + tokenizer for GranAlign.

    Args:
        image_processor: the vision tower's image processor (any `AutoImageProcessor`), or `None` for a
            model on precomputed region features, which has no vision tower.
        tokenizer: the text tower's tokenizer (any `AutoTokenizer`).
        max_length: caption length `L` in tokens; captions are truncated to it and, with the default
            `padding="max_length"`, padded to it. Saved with the processor.

    Outputs (see `__call__`): `input_ids`/`attention_mask` `[B, L]` long; `pixel_values [B, 3, H, W]`
    float; or `region_features [B, N_max, D]` float32 + `region_mask [B, N_max]` long
    (+ `region_boxes [B, N_max, 4]`).
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, max_length: int = 32, **kwargs: Any
    ):
        # `max_length` must stay a positional-or-keyword parameter: `from_args_and_dict` only passes the
        # saved values of those (it reads `__init__.__code__.co_varnames[:co_argcount]`).
        if tokenizer is None:
            raise ValueError(
                "GranAlignProcessor needs a tokenizer (the text tower's AutoTokenizer), got None."
            )
        super().__init__(image_processor, tokenizer, **kwargs)
        self.max_length = _check_max_length(max_length, tokenizer)

    # -- optional image processor -------------------------------------------------------------------
    # ProcessorMixin (transformers 5.x) has no notion of an optional sub-processor: it derives the
    # attribute list ["image_processor", "tokenizer"] from this `__init__` signature, type-checks every
    # one (None fails), calls methods on each when saving, and loads each with its Auto class. The three
    # overrides below let `image_processor=None` through those three places; the saved
    # processor_config.json then holds `"image_processor": null`, which is what loading looks for.

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        """Accept `image_processor=None`; every other argument is type-checked by ProcessorMixin."""
        if argument_name == "image_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any):
        """Save the tokenizer files and `processor_config.json` (with the image processor's settings, or
        `"image_processor": null` for a tokenizer-only processor) into `save_directory`."""
        if self.image_processor is not None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        # ProcessorMixin.save_pretrained loops over `self.get_attributes()` calling methods on each
        # sub-processor; for the duration of the save, this instance lists only its tokenizer.
        # (`to_dict` reads the class-level list, so `"image_processor": null` is still written.)
        self.get_attributes = lambda: ["tokenizer"]
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            del self.get_attributes

    @classmethod
    def _get_arguments_from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        processor_dict: dict | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Load the sub-processors; a saved `"image_processor": null` loads as `None` (tokenizer only)."""
        if (
            processor_dict is not None
            and "image_processor" in processor_dict
            and processor_dict["image_processor"] is None
        ):
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
            return [None, tokenizer]
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------------

    @property
    def model_input_names(self) -> list[str]:
        """The keys `__call__` can return (pixel values only when there is an image processor)."""
        image_names = _IMAGE_INPUT_NAMES if self.image_processor is not None else []
        return _TEXT_INPUT_NAMES + image_names + _REGION_INPUT_NAMES

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageLike | Sequence[ImageLike] | None = None,
        regions: ArrayLike | None = None,
        region_boxes: ArrayLike | None = None,
        *,
        return_tensors: str | None = "pt",
        padding: bool | str = "max_length",
        truncation: bool | str = True,
        max_length: int | None = None,
        paired: bool = False,
        text_kwargs: dict[str, Any] | None = None,
        images_kwargs: dict[str, Any] | None = None,
    ) -> BatchFeature:
        """Tokenize captions and preprocess images or pad region features.

        Args:
            text: one caption or a list of `B_txt` captions (none empty).
            images: one image or `B_img` images: PIL (any mode), numpy or torch, `[H, W]`, `[H, W, C]` or
                `[C, H, W]` with C in 1..4, uint8/16-bit/bool/float in [0, 1] or [0, 255], or a list or a
                4-D batch of them. Everything is converted to RGB (alpha composited on white) before
                the image processor. numpy 3-D arrays are read channels-last when their last dim can be
                channels, torch tensors channels-first when their first dim can.
            regions: precomputed region features instead of `images`: one `[N, D]` array, a `[B, N, D]`
                array or a list of `[N_i, D]` arrays (numpy/torch/nested lists); padded to `N_max`.
            region_boxes: optional `[N_i, 4]` boxes matching `regions` one to one.
            return_tensors: "pt" (default), "np" or None.
            padding: "max_length" (pad to `max_length`, the default), "longest"/True (pad to the longest
                caption, at most `max_length`), or False/"do_not_pad".
            truncation: passed to the tokenizer (default True: cut captions at `max_length`).
            max_length: caption length for this call; defaults to `self.max_length`.
            paired: the texts and images/regions are pairs (text `i` describes image `i`), so their counts
                must match. Off by default: as in CLIP, `B_txt` captions and `B_img` images may differ
                in number when every caption is scored against every image.
            text_kwargs: extra keyword arguments for the tokenizer.
            images_kwargs: extra keyword arguments for the image processor.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` `[B_txt, L]` (if `text`), `pixel_values
            [B_img, 3, H, W]` (if `images`), `region_features [B_img, N_max, D]` float32 and `region_mask
            [B_img, N_max]` long, 1 = real region (if `regions`), `region_boxes [B_img, N_max, 4]`
            float32 (if `region_boxes`).
        """
        if text is None and images is None and regions is None:
            raise ValueError(
                "Nothing to process: pass `text`, `images` or `regions` (or text with one of the others)."
            )
        if images is not None and regions is not None:
            raise ValueError(
                "Pass either `images` (for a model with a vision tower) or `regions` (precomputed region "
                "features), not both."
            )
        if region_boxes is not None and regions is None:
            raise ValueError(
                "`region_boxes` was given without `regions`; boxes describe the regions' features."
            )
        if return_tensors not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {_TENSOR_TYPES}, got {return_tensors!r}.")

        data: dict[str, Any] = {}
        num_texts = num_images = None

        if text is not None:
            captions = _caption_list(text)
            num_texts = len(captions)
            data.update(
                self._tokenize(captions, return_tensors, padding, truncation, max_length, text_kwargs)
            )

        if images is not None:
            if self.image_processor is None:
                raise ValueError(
                    "This processor has no image processor: the model it belongs to takes precomputed region "
                    "features, not pixels. Pass `regions=` ([N, D] arrays) instead of `images=`."
                )
            pil_images = [_to_rgb_image(image, index) for index, image in enumerate(_image_list(images))]
            num_images = len(pil_images)
            pixels = self.image_processor(
                images=pil_images, return_tensors=return_tensors, **(images_kwargs or {})
            )
            data["pixel_values"] = pixels["pixel_values"]

        if regions is not None:
            region_arrays = _region_list(regions, "regions")
            num_images = len(region_arrays)
            dims = sorted({array.shape[1] for array in region_arrays})
            if len(dims) > 1:
                detail = ", ".join(
                    f"regions[{i}]: D={array.shape[1]}" for i, array in enumerate(region_arrays)
                )
                raise ValueError(f"All region arrays must share the feature size D; got {dims} ({detail}).")
            data["region_features"], data["region_mask"] = _pad_regions(region_arrays)
            if region_boxes is not None:
                data["region_boxes"] = self._pad_boxes(region_boxes, region_arrays)

        if paired:
            if num_texts is None or num_images is None:
                raise ValueError("paired=True needs both `text` and `images` or `regions`.")
            if num_texts != num_images:
                kind = "images" if images is not None else "region arrays"
                raise ValueError(
                    f"paired=True but got {num_texts} captions and {num_images} {kind}; paired inputs need "
                    "one caption per image (pass paired=False to score every caption against every image)."
                )

        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(
        self,
        captions: list[str],
        return_tensors: str | None,
        padding: bool | str,
        truncation: bool | str,
        max_length: int | None,
        text_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Tokenize to `input_ids` and `attention_mask` `[B, L]` (no token type ids)."""
        if isinstance(padding, str) and padding not in _PADDING_STRATEGIES:
            raise ValueError(f"padding must be True, False or one of {_PADDING_STRATEGIES}, got {padding!r}.")
        if not isinstance(padding, (bool, str)):
            raise TypeError(f"padding must be a bool or a string, got {type(padding).__name__}.")
        length = self.max_length if max_length is None else _check_max_length(max_length, self.tokenizer)
        encoded = self.tokenizer(
            captions,
            padding=padding,
            truncation=truncation,
            max_length=length,
            return_tensors=return_tensors,
            return_token_type_ids=False,
            return_attention_mask=True,
            **(text_kwargs or {}),
        )
        return {name: encoded[name] for name in _TEXT_INPUT_NAMES}

    @staticmethod
    def _pad_boxes(region_boxes: ArrayLike, region_arrays: list[np.ndarray]) -> np.ndarray:
        """Validate boxes against the regions and pad them to `[B, N_max, 4]` float32."""
        boxes = _region_list(region_boxes, "region_boxes")
        if len(boxes) != len(region_arrays):
            raise ValueError(
                f"Got {len(boxes)} region_boxes arrays for {len(region_arrays)} region arrays; "
                "expected one per image."
            )
        for index, (box, feats) in enumerate(zip(boxes, region_arrays, strict=True)):
            if box.shape[1] != 4:
                raise ValueError(
                    f"region_boxes[{index}] has shape {tuple(box.shape)}; expected [N, 4] (x0, y0, x1, y1)."
                )
            if box.shape[0] != feats.shape[0]:
                raise ValueError(
                    f"region_boxes[{index}] has {box.shape[0]} boxes but regions[{index}] has "
                    f"{feats.shape[0]} regions; expected one box per region."
                )
        return _pad_regions(boxes)[0]

    # -- decoding -------------------------------------------------------------------------------------

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Forward to the tokenizer's `batch_decode`: `[B, L]` token ids -> `B` strings."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Forward to the tokenizer's `decode`: `[L]` token ids -> a string."""
        return self.tokenizer.decode(*args, **kwargs)
