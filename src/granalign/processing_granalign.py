"""GranAlign's processor: tokenizer + image processor (or precomputed region features), in the transformers 5
processor convention (`processor(images=..., text=..., **kwargs)`, typed kwargs routed to both).

It travels with saved checkpoints (`register_for_auto_class`) and loads with `trust_remote_code=True` where
`granalign` is not installed, so it imports only numpy, PIL, torch and transformers.

    >>> processor = GranAlignProcessor(image_processor, tokenizer, max_length=32)
    >>> processor(images=[pil_image], text=["a dog on a mat"], padding="longest")
    # input_ids, attention_mask [1, L]; pixel_values [1, 3, H, W]
    >>> GranAlignProcessor(tokenizer=tokenizer)(text=captions, regions=[feats_a, feats_b])  # region models
    # input_ids, attention_mask; region_features [2, N_max, D]; region_mask [2, N_max]
"""

import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ChannelDimension, ImageInput, load_image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

if TYPE_CHECKING:
    from typing import Unpack

__all__ = [
    "MAX_IMAGE_PIXELS_VARIABLE",
    "GranAlignProcessor",
    "GranAlignProcessorKwargs",
    "open_image",
    "to_rgb_pil",
]

DEFAULT_MAX_LENGTH = 32
_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_WHITE = (255, 255, 255, 255)
# Largest image (width x height) `open_image` decodes, unless this environment variable sets another limit.
MAX_IMAGE_PIXELS_VARIABLE = "GRANALIGN_MAX_IMAGE_PIXELS"
_DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default (about 9,500 x 9,500)


def _max_image_pixels() -> int:
    raw = os.environ.get(MAX_IMAGE_PIXELS_VARIABLE, "").strip()
    if not raw:
        return _DEFAULT_MAX_IMAGE_PIXELS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_IMAGE_PIXELS_VARIABLE} must be a positive integer (pixels), got {raw!r}")
    return int(raw)


def open_image(path: "str | os.PathLike[str]") -> Image.Image:
    """The one way an image file is read (processor, `index`, `explain`, the demo): an RGB PIL image.

    EXIF orientation applied; transparency composited on white; palette, CMYK, 16-bit and float modes
    brought to 8-bit RGB (`_pil_to_rgb`). A missing, truncated or non-image file, or one larger than
    `$GRANALIGN_MAX_IMAGE_PIXELS` (default Pillow's 89.5 Mpx), is a `ValueError`/`FileNotFoundError`
    naming the file, checked from the header before the pixels are decoded.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"image file {name!r} does not exist")
    limit = _max_image_pixels()
    try:
        with warnings.catch_warnings(), Image.open(name) as opened:  # the limit below replaces Pillow's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = opened.size
            if width * height <= limit:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return _pil_to_rgb(image, 0)
    except Image.DecompressionBombError as error:  # beyond twice Pillow's own limit: refused at open
        raise ValueError(
            f"image file {name!r}: {error} (set {MAX_IMAGE_PIXELS_VARIABLE} and Pillow's "
            "Image.MAX_IMAGE_PIXELS to allow larger images)"
        ) from None
    except MemoryError:
        raise
    # PIL: not an image, truncated, or damaged (OSError, SyntaxError, and ValueError, struct.error, ...)
    except Exception as error:
        raise ValueError(f"cannot read image file {name!r}: {error}") from None
    raise ValueError(
        f"image file {name!r} is {width}x{height} = {width * height} pixels, more than the limit of "
        f"{limit} (set {MAX_IMAGE_PIXELS_VARIABLE} to allow larger images)"
    )


class GranAlignProcessorKwargs(ProcessingKwargs, total=False):
    """transformers' kwargs plus `paired`: text `i` describes image `i`, so the counts must match (off by
    default: as in CLIP, every caption is scored against every image)."""

    paired: bool


# -------------------------------------------------------------------------------- text and regions


def _caption_list(text: Any) -> list[str]:
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


def _check_vocabulary(tokenizer: Any, source: Any) -> None:
    """Refuse a tokenizer that loaded without its vocabulary files (transformers then builds one of only
    the special tokens, and every caption becomes [UNK]: the same ranking for every query)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    if len(tokenizer) <= len(specials):
        raise ValueError(
            f"the tokenizer saved in {str(source)!r} has only its {len(tokenizer)} special tokens: its vocabulary "
            "files (tokenizer.json, vocab.txt, ...) are missing; save the processor again "
            "(processor.save_pretrained) or copy them from the text tower"
        )


def _check_max_length(max_length: Any, tokenizer: Any) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the tokenizer's model_max_length={limit} "
            "(the text tower has no positions beyond it)."
        )
    # below this the tokenizer cannot truncate (it returns the whole caption) or keeps no word at all
    specials = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    if max_length <= specials:
        raise ValueError(
            f"max_length={max_length} leaves no room for words: the tokenizer adds {specials} special tokens "
            f"to every caption; use max_length >= {specials + 1}."
        )
    return max_length


def _check_token_lengths(encoded: Any, tokenizer: Any) -> None:
    """Refuse captions tokenized longer than the tokenizer's `model_max_length` (with truncation off):
    the text tower has no positions for them, and would fail deep inside torch."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int):
        return
    rows = encoded.get("attention_mask")
    if rows is None:  # no mask asked for: every row is as long as it is
        lengths = [len(row) for row in encoded["input_ids"]]
    elif isinstance(rows, torch.Tensor) or (isinstance(rows, np.ndarray) and rows.dtype != object):
        lengths = rows.sum(-1).tolist()
    else:  # lists, or the object array of rows numpy gives unpadded captions
        lengths = [sum(row) for row in rows]
    for index, length in enumerate(lengths):
        if length > limit:
            raise ValueError(
                f"text[{index}] is {int(length)} tokens long, more than the tokenizer's model_max_length="
                f"{limit} (the text tower has no positions beyond it); keep truncation=True."
            )


def _float_arrays(value: Any, name: str) -> list[np.ndarray]:
    """Per-image float32 `[N, D]` arrays from one `[N, D]` array, a `[B, N, D]` batch or a list of arrays."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim not in (2, 3):
            raise ValueError(
                f"`{name}` has shape {tuple(value.shape)}; expected [N, D] for one image, or [B, N, D] or a "
                "list of [N, D] arrays for a batch."
            )
        items = [value] if value.ndim == 2 else list(value)
        labels = [f"`{name}`"] * len(items)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` is an empty list; expected at least one [N, D] array.")
        items, labels = list(value), [f"{name}[{index}]" for index in range(len(value))]
    else:
        raise TypeError(
            f"`{name}` must be a numpy array, a torch tensor or a list of them, got {type(value).__name__}."
        )
    arrays = []
    for index, (item, label) in enumerate(zip(items, labels, strict=True)):
        # real numbers only: float32 would silently drop a complex value's imaginary part
        if isinstance(item, torch.Tensor):
            if item.is_complex():
                raise TypeError(f"{label} has dtype {item.dtype}; expected a real numeric tensor.")
            item = item.detach().cpu().float().numpy()
        if isinstance(item, np.ndarray) and item.dtype.kind not in "biuf":
            raise TypeError(f"{label} has dtype {item.dtype}; expected a real numeric array.")
        if not isinstance(item, (np.ndarray, list, tuple)):
            raise TypeError(
                f"{label} is a {type(item).__name__}; expected a numpy array, torch tensor or nested list."
            )
        try:
            array = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label} is not a rectangular numeric array: {error}") from None
        shape = tuple(array.shape)
        if array.ndim != 2:
            raise ValueError(f"{name}[{index}] has shape {shape}; expected a 2-D array [N, D].")
        if 0 in shape:
            raise ValueError(
                f"{name}[{index}] has shape {shape}; every image needs at least one region (N >= 1) and D >= 1."
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}[{index}] contains NaN or infinite values.")
        arrays.append(array)
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


def _region_inputs(regions: Any, region_boxes: Any) -> dict[str, np.ndarray]:
    """`region_features [B, N_max, D]`, `region_mask [B, N_max]` (+ `region_boxes [B, N_max, 4]`)."""
    arrays = _float_arrays(regions, "regions")
    dims = sorted({array.shape[1] for array in arrays})
    if len(dims) > 1:
        detail = ", ".join(f"regions[{i}]: D={array.shape[1]}" for i, array in enumerate(arrays))
        raise ValueError(f"All region arrays must share the feature size D; got {dims} ({detail}).")
    features, mask = _pad_regions(arrays)
    data = {"region_features": features, "region_mask": mask}
    if region_boxes is None:
        return data
    boxes = _float_arrays(region_boxes, "region_boxes")
    if len(boxes) != len(arrays):
        raise ValueError(
            f"Got {len(boxes)} region_boxes arrays for {len(arrays)} region arrays; expected one per image."
        )
    for index, (box, feats) in enumerate(zip(boxes, arrays, strict=True)):
        if box.shape[1] != 4:
            raise ValueError(
                f"region_boxes[{index}] has shape {tuple(box.shape)}; expected [N, 4] (x0, y0, x1, y1)."
            )
        if box.shape[0] != feats.shape[0]:
            raise ValueError(
                f"region_boxes[{index}] has {box.shape[0]} boxes but regions[{index}] has "
                f"{feats.shape[0]} regions; expected one box per region."
            )
    data["region_boxes"] = _pad_regions(boxes)[0]
    return data


# ----------------------------------------------------------------------------------------- images
# The image processor converts PIL/numpy/torch images, reads their layout, resizes, rescales and
# normalises them. GRM only hands it each one as RGB: transparency composited on white, grayscale
# repeated, 16-bit and boolean pixels brought to 8 bits.


def _image_list(images: Any) -> list[Any]:
    """Single images from one image, a (nested) list of them or a 4-D `[B, ...]` batch."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _image_list(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _pil_to_rgb(image: Image.Image, index: int) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit/float modes rescaled to 8 bits."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"image {index} is empty: size {width}x{height} (width x height).")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # PIL's own conversion clips these at 255 instead of rescaling them
        array = np.asarray(image)
        if image.mode == "F":  # float pixels in [0, 1] or [0, 255]
            array = np.clip(np.round(array * 255.0 if array.max() <= 1.0 else array), 0, 255).astype(np.uint8)
        image = Image.fromarray(_to_8bit(array, index))
    if image.mode == "La":
        image = image.convert("LA")
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(array: np.ndarray, index: int) -> np.ndarray:
    """Integer pixels -> uint8 (16-bit ones divided by 257), bool -> {0, 255}; floats are checked only."""
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
            return np.round(array / 257.0).astype(np.uint8)
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"image {index} contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"image {index} has float values in [{low:.3g}, {high:.3g}]; expected raw pixels in "
                "[0, 255], or [0, 1] with do_rescale=False (the image processor normalises them)."
            )
        return array
    raise TypeError(f"image {index} has dtype {array.dtype}; expected an integer, boolean or floating dtype.")


def _channel_axis(shape: tuple[int, ...], index: int, data_format: Any) -> int:
    """The channel axis (0 or -1) of a 3-D image: `input_data_format` if given, else inferred as the
    image processors infer it (first dim first, channel counts 1/3/4), then 2 (grayscale + alpha)."""
    if data_format is not None:
        axis = 0 if ChannelDimension(data_format) == ChannelDimension.FIRST else -1
        if shape[axis] not in (1, 2, 3, 4):
            raise ValueError(
                f"image {index} has shape {shape} and {shape[axis]} channels with input_data_format="
                f"{str(data_format)!r}; expected 1, 2, 3 or 4 (L, LA, RGB, RGBA)."
            )
        return axis
    for counts in ((1, 3, 4), (2,)):
        if shape[0] in counts:
            return 0
        if shape[-1] in counts:
            return -1
    raise ValueError(
        f"image {index} has shape {shape}; a 3-D image needs 1, 2, 3 or 4 channels in its first or last "
        "dim (pass a batch of grayscale images as a list or as [B, H, W, 1])."
    )


def _array_to_rgb(array: np.ndarray, index: int, data_format: Any) -> np.ndarray:
    """A `[H, W]`, `[H, W, C]` or `[C, H, W]` array -> 3 channels on the same axis, dtype kept (8-bit)."""
    shape = tuple(array.shape)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"image {index} has shape {shape}; expected [H, W], [H, W, C] or [C, H, W] (or a list or a "
            "[B, ...] batch of them)."
        )
    if 0 in shape:
        raise ValueError(f"image {index} is empty: shape {shape}.")
    array = _to_8bit(array, index)
    if array.ndim == 2:  # channels first (unless told otherwise), which no layout inference misreads
        last = data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST
        axis, array = (-1, array[..., None]) if last else (0, array[None])
    else:
        axis = _channel_axis(shape, index, data_format)
    pixels = np.moveaxis(array, axis, -1)
    if pixels.shape[-1] in (2, 4):  # composite the alpha channel on white
        white = 255.0 if pixels.dtype == np.uint8 or pixels[..., -1].max() > 1.0 else 1.0
        alpha = pixels[..., -1:] / white
        mixed = pixels[..., :-1] * alpha + white * (1.0 - alpha)
        pixels = np.round(mixed).astype(np.uint8) if white == 255.0 else mixed.astype(pixels.dtype)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.moveaxis(pixels, -1, axis)


def _to_rgb_image(image: Any, index: int, data_format: Any) -> Image.Image | np.ndarray:
    """One input image (PIL, numpy, torch, or a path/URL/base64 string) -> RGB PIL or 3-channel array."""
    if isinstance(image, str):  # as transformers processors take them; files keep their transparency
        if os.path.isfile(image):
            return open_image(image)
        image = load_image(image)  # a URL or base64
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, index)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float() if image.dtype in (torch.float16, torch.bfloat16) else image
        image = image.numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, index, data_format)
    raise TypeError(
        f"image {index} is a {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor "
        "or a path/URL string."
    )


def to_rgb_pil(image: Any, data_format: Any = None) -> Image.Image:
    """One image (a path, PIL image, numpy array or torch tensor) as the RGB PIL image the processor sees:
    what `explain` and the demo show and score, so they never disagree with the processor."""
    rgb = _to_rgb_image(image, 0, data_format)
    if isinstance(rgb, Image.Image):
        return rgb
    pixels = np.moveaxis(rgb, _channel_axis(rgb.shape, 0, data_format), -1)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------- processor

# Stands for the image processor a tokenizer-only processor does not load (see `_resolve_subprocessors`).
_NOT_LOADED = object()


def _saved_without_image_processor(processor_dict: dict | None) -> bool:
    """Whether a processor_config.json dict is a tokenizer-only processor's (`"image_processor": null`)."""
    return (processor_dict or {}).get("image_processor", "absent") is None


def _set_max_length(loaded: Any, max_length: int | None) -> Any:
    """A loaded processor (or `(processor, unused_kwargs)`) with `max_length` set, when it is given."""
    if max_length is not None:
        (loaded[0] if isinstance(loaded, tuple) else loaded).max_length = max_length
    return loaded


class GranAlignProcessor(ProcessorMixin):
    """Tokenizer + image processor (optional) for GranAlign.

    Args:
        image_processor: the vision tower's image processor (any `AutoImageProcessor`), or `None` for a
            model on precomputed region features, which has no vision tower.
        tokenizer: the text tower's tokenizer (any `AutoTokenizer`).
        max_length: caption length `L` in tokens (truncated to it, and padded to it by the default
            `padding="max_length"`). Defaults to the tokenizer's own `max_length` setting if it has one, else
            32 (at most its `model_max_length`). Saved in `processor_config.json`; a call's `max_length=`
            overrides it.
    """

    valid_processor_kwargs = GranAlignProcessorKwargs
    # Call defaults, lowest priority: the tokenizer's init kwargs and each call's kwargs override them.
    text_kwargs = {  # noqa: RUF012 (transformers reads these class attributes)
        "padding": "max_length",
        "truncation": True,
        "return_token_type_ids": False,
        "return_tensors": "pt",
    }
    images_kwargs = {"return_tensors": "pt"}  # noqa: RUF012
    paired = False

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any):
        # `max_length` comes through **kwargs: an explicit `__init__` argument may not share a name with
        # a call kwarg (transformers' processor convention). `to_dict`/`from_args_and_dict` keep it saved.
        max_length = kwargs.pop("max_length", None)
        if tokenizer is None:
            raise ValueError(
                "GranAlignProcessor needs a tokenizer (the text tower's AutoTokenizer), got None."
            )
        super().__init__(image_processor, tokenizer, **kwargs)
        if max_length is None:  # the tokenizer's own max_length setting (transformers' rule), else 32
            max_length = tokenizer.init_kwargs.get("max_length") or DEFAULT_MAX_LENGTH
            limit = getattr(tokenizer, "model_max_length", None)
            max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        self.max_length = max_length

    @property
    def max_length(self) -> int:
        """The default caption length `L` (this processor's `text_kwargs["max_length"]`)."""
        return self.text_kwargs["max_length"]

    @max_length.setter
    def max_length(self, value: int) -> None:
        self.text_kwargs = {**type(self).text_kwargs, "max_length": _check_max_length(value, self.tokenizer)}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "max_length": self.max_length}

    # -- loading ----------------------------------------------------------------------------------------
    # `from_pretrained` reads processor_config.json, loads the sub-processors, then builds the processor.
    # transformers <= 5.24 does the last two through `_get_arguments_from_pretrained` + `from_args_and_dict`,
    # 5.25 through `_resolve_subprocessors` + `from_dict`; each pair is overridden the same way: a saved
    # `"image_processor": null` loads no image processor, `max_length` is this processor's setting (not the
    # tokenizer's), and the tokenizer's vocabulary is checked.

    @classmethod
    def from_args_and_dict(cls, args: Any, processor_dict: dict[str, Any], **kwargs: Any):
        """As ProcessorMixin's (transformers <= 5.24), plus the saved (or overriding) `max_length`."""
        max_length = kwargs.pop("max_length", processor_dict.get("max_length"))
        return _set_max_length(super().from_args_and_dict(args, processor_dict, **kwargs), max_length)

    @classmethod
    def from_dict(cls, processor_dict: dict[str, Any], **kwargs: Any):
        """As ProcessorMixin's (transformers >= 5.25), plus the saved (or overriding) `max_length`."""
        max_length = kwargs.pop("max_length", processor_dict.get("max_length"))
        return _set_max_length(super().from_dict(processor_dict, **kwargs), max_length)

    @classmethod
    def _get_arguments_from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        processor_dict: dict | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        kwargs.pop("max_length", None)  # this processor's setting, not the tokenizer's
        if _saved_without_image_processor(processor_dict):
            arguments = [None, AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)]
        else:
            arguments = super()._get_arguments_from_pretrained(
                pretrained_model_name_or_path, processor_dict, **kwargs
            )
        _check_vocabulary(arguments[-1], pretrained_model_name_or_path)
        return arguments

    @classmethod
    def _resolve_subprocessors(
        cls, pretrained_model_name_or_path: str | os.PathLike, processor_dict: dict, **kwargs: Any
    ) -> tuple[dict, dict]:
        max_length = kwargs.pop("max_length", None)
        if _saved_without_image_processor(processor_dict) and kwargs.get("image_processor") is None:
            kwargs["image_processor"] = _NOT_LOADED  # ProcessorMixin keeps a passed sub-processor as it is
        processor_dict, kwargs = super()._resolve_subprocessors(
            pretrained_model_name_or_path, processor_dict, **kwargs
        )
        if processor_dict.get("image_processor") is _NOT_LOADED:
            processor_dict["image_processor"] = None
        _check_vocabulary(processor_dict["tokenizer"], pretrained_model_name_or_path)
        if max_length is not None:
            kwargs["max_length"] = max_length
        return processor_dict, kwargs

    # -- optional image processor -------------------------------------------------------------------
    # ProcessorMixin has no notion of an optional sub-processor: it derives the attribute list
    # ["image_processor", "tokenizer"] from the `__init__` signature, type-checks every one (None fails),
    # calls methods on each when saving, and loads each with its Auto class. These two overrides and the
    # loading ones above let `image_processor=None` through; processor_config.json then holds
    # `"image_processor": null`.

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "image_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any):
        # save_pretrained loops over `self.get_attributes()`: for the save, a tokenizer-only instance lists
        # only its tokenizer (`to_dict` reads the class-level list, so `"image_processor": null` is written).
        if self.image_processor is None:
            self.get_attributes = lambda: ["tokenizer"]
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            vars(self).pop("get_attributes", None)
            # saving writes the `auto_map` of a registered class through this instance; a loaded processor
            # has none, and neither does this one once saved
            vars(self).pop("auto_map", None)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the processor to the Hub (transformers' `push_to_hub` arguments). With `granalign` installed
        it never writes transformers' placeholder card (`granalign.hub.pretrained.push_processor_to_hub`)."""
        try:
            from granalign.hub.pretrained import push_processor_to_hub
        except ImportError as err:
            if (getattr(err, "name", None) or "granalign").split(".")[0] != "granalign":
                raise  # granalign is there but broken: say so rather than push a different card
            return super().push_to_hub(repo_id, **kwargs)
        return push_processor_to_hub(self, repo_id, **kwargs)

    # -- inputs ---------------------------------------------------------------------------------------

    @property
    def model_input_names(self) -> list[str]:
        """What a call with text and images (pixel models) or regions (region models) returns."""
        image_names = (
            ["pixel_values"] if self.image_processor is not None else ["region_features", "region_mask"]
        )
        return ["input_ids", "attention_mask", *image_names]

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        regions: Any = None,
        region_boxes: Any = None,
        **kwargs: "Unpack[GranAlignProcessorKwargs]",
    ) -> BatchFeature:
        """Tokenize captions and preprocess images, or pad precomputed region features.

        Args:
            images: `B_img` images (PIL in any mode, numpy/torch `[H, W]`, `[H, W, C]` or `[C, H, W]`, paths
                or URLs), one, a nested list or a `[B, ...]` batch. Each reaches the image processor as RGB;
                it reads the layout (`input_data_format=` forces it) and rescales (`do_rescale=False` for
                floats in [0, 1]).
            text: one caption or a list of `B_txt` captions (none empty).
            regions: precomputed region features instead of images: `[N, D]`, `[B, N, D]` or a list of
                `[N_i, D]` (numpy/torch/nested lists); `region_boxes`: their `[N_i, 4]` boxes (optional).
            **kwargs: tokenizer and image processor kwargs, flat or in `text_kwargs=` / `images_kwargs=` /
                `common_kwargs=` (defaults: `padding="max_length"`, `truncation=True`, this processor's
                `max_length`, `return_tensors="pt"`); `paired=True` requires `B_txt == B_img`.

        Returns:
            `BatchFeature`: `input_ids`, `attention_mask` `[B_txt, L]`; `pixel_values [B_img, 3, H, W]`; or
            `region_features [B_img, N_max, D]` float32, `region_mask [B_img, N_max]` long (1 = real region)
            and `region_boxes [B_img, N_max, 4]`.
        """
        if images is None and text is None and regions is None:
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
        if images is not None and self.image_processor is None:
            raise ValueError(
                "This processor has no image processor: the model it belongs to takes precomputed region "
                "features, not pixels. Pass `regions=` ([N, D] arrays) instead of `images=`."
            )
        # The tokenizer's init kwargs are defaults too, but `max_length` is this processor's (it took the
        # tokenizer's when built without one): a fast tokenizer saves the truncation length it last used.
        init_kwargs = {key: value for key, value in self.tokenizer.init_kwargs.items() if key != "max_length"}
        merged = self._merge_kwargs(GranAlignProcessorKwargs, tokenizer_init_kwargs=init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]

        data: dict[str, Any] = {}
        if text is not None:
            captions = _caption_list(text)
            padding = text_kwargs.get("padding")
            if not (isinstance(padding, bool) or padding in _PADDING_STRATEGIES):
                raise ValueError(
                    f"padding must be True, False or one of {_PADDING_STRATEGIES}, got {padding!r}."
                )
            if text_kwargs.get("max_length") is not None:
                _check_max_length(text_kwargs["max_length"], self.tokenizer)
            encoded = self.tokenizer(captions, **text_kwargs)
            _check_token_lengths(encoded, self.tokenizer)
            data.update(encoded)
        if images is not None:
            flat = _image_list(images)
            if not flat:
                raise ValueError("`images` is an empty list; expected at least one image.")
            layout = images_kwargs.get("input_data_format")
            rgb = [_to_rgb_image(image, index, layout) for index, image in enumerate(flat)]
            data.update(self.image_processor(rgb, **images_kwargs))
        if regions is not None:
            data.update(_region_inputs(regions, region_boxes))

        if merged.get("paired"):
            if text is None or (images is None and regions is None):
                raise ValueError("paired=True needs both `text` and `images` or `regions`.")
            num_images = len(rgb) if images is not None else len(data["region_mask"])
            if len(captions) != num_images:
                kind = "images" if images is not None else "region arrays"
                raise ValueError(
                    f"paired=True but got {len(captions)} captions and {num_images} {kind}; paired inputs "
                    "need one caption per image (pass paired=False to score every caption against every image)."
                )
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"))
