"""How the towers train: frozen, LoRA-adapted (peft) or fully tuned, optionally gradient-checkpointed.

`configure_towers(model, recipe.model)` (called by `build_model`) applies the `ModelRecipe` keys:

- `freeze_vision_tower` / `freeze_text_tower`: the tower's weights get `requires_grad=False` (and eval
  mode); only the GRM parts train.
- `vision_lora` / `text_lora`: keyword arguments of `peft.LoraConfig`, e.g.
  `{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"]}`. The adapters
  are injected in place (`peft.inject_adapter_in_model`) into `model.vision_model` / `model.text_model`,
  which stay the same transformers modules, so `encode_image` / `encode_text` are unchanged. The tower's
  own weights are frozen and only the LoRA matrices train (plus the biases with peft's `bias="all"` /
  `"lora_only"`); the rest of the GRM model trains as before. `modules_to_save` is refused: train such a
  tower fully instead. Without `target_modules`, the attention query and value projections are adapted,
  under whichever names the tower uses (`DEFAULT_TARGET_MODULES`, first match wins):
  `query`/`value` (BERT, RoBERTa, MiniLM, ELECTRA; ViT/DeiT/DINOv2/Swin before transformers 5),
  `q_proj`/`v_proj` (ViT, DINOv2, Swin in transformers 5, CLIP, SigLIP), `q_lin`/`v_lin` (DistilBERT),
  `q`/`v` (MPNet), and for ConvNeXt, which has no attention, its pointwise MLP `pwconv1`/`pwconv2`.
  Other towers fall back to peft's own table by model type, else an error lists their linear layers.
- `gradient_checkpointing`: `activation_checkpointing_enable` (`gradient_checkpointing_enable` on older
  transformers) on the whole `GranAlignModel`, which sets the flag of every checkpointable layer of both
  towers, with non-reentrant `torch.utils.checkpoint` (exact recomputation, RNG included, so loss and
  gradients match an unchecked run). The input-embedding hooks transformers adds for reentrant
  checkpointing are removed again: non-reentrant checkpointing does not need them, and they would make
  a frozen tower take part in the backward pass. A tower with no checkpointable layer (ConvNeXt) runs
  unchecked, with a warning.

Optimizer: LoRA matrices are new, freshly initialised parameters (B starts at zero), so
`optim.parameter_groups` puts them in the "new" groups with the full `optim.lr`, not in the backbone
groups with `lr * backbone_lr_multiplier` (LoRA is usually trained with about 10x the full fine-tuning
learning rate); as matrices they get weight decay. Tower parameters that peft leaves trainable
(`bias="all"`) are pretrained weights and keep the backbone learning rate. `adapter_parameter_ids` tells
them apart.

Saving: `merged_state_dict` gives the weights with every adapter merged into its base layer, under the
plain tower key names, without touching the live model; `checkpoint.save_model_dir` (`best/`, `final/`)
saves those, so a saved model loads with plain `from_pretrained` and no peft. Accelerate checkpoints keep
the unmerged adapter weights: a resumed run rebuilds the same adapted model from the recipe and loads
them back.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from granalign.modeling_granalign import GranAlignModel

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adapter_parameter_ids",
    "add_lora",
    "configure_towers",
    "default_target_modules",
    "enable_gradient_checkpointing",
    "merged_state_dict",
]

DEFAULT_TARGET_MODULES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, ELECTRA (ViT/DeiT/DINOv2/Swin before transformers 5)
    ("q_proj", "v_proj"),  # ViT, DINOv2, Swin (transformers 5), CLIP, SigLIP
    ("q_lin", "v_lin"),  # DistilBERT
    ("q", "v"),  # MPNet
    ("pwconv1", "pwconv2"),  # ConvNeXt: no attention, its pointwise MLP
)
"""Default LoRA targets, tried in order: the first pair whose names all occur in the tower wins."""


def configure_towers(model: GranAlignModel, recipe_model: Any) -> GranAlignModel:
    """Freeze, LoRA-adapt and/or checkpoint the towers as `recipe_model` (a `ModelRecipe`) says.

    Returns `model`, changed in place.
    """
    for key, tower in (("vision", model.vision_model), ("text", model.text_model)):
        frozen = getattr(recipe_model, f"freeze_{key}_tower", False)
        lora = getattr(recipe_model, f"{key}_lora", None)
        if tower is None:  # precomputed regions: nothing to freeze, but no tower to adapt either
            if lora is not None:
                raise _recipe_error(f"model.{key}_lora: the model has no {key} tower")
            continue
        if frozen and lora is not None:
            raise _recipe_error(f"model.freeze_{key}_tower and model.{key}_lora exclude each other: pick one")
        if frozen:
            tower.requires_grad_(False).eval()
            if key == "vision":  # the last blocks that run after the cache still train
                for module in model.vision_tuned_modules:
                    module.requires_grad_(True)
        if lora is not None:
            add_lora(tower, lora, f"model.{key}_lora")
    if getattr(recipe_model, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    return model


# ----------------------------------------------------------------------------------------------- LoRA
def _recipe_error(message: str) -> Exception:
    from granalign.training.recipe import RecipeError

    return RecipeError(message)


def _layer_names(tower: nn.Module) -> set[str]:
    """Last name components of the tower's linear and convolution layers."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {name.rpartition(".")[2] for name, module in tower.named_modules() if isinstance(module, kinds)}


def default_target_modules(tower: nn.Module, key: str = "lora") -> list[str] | None:
    """The LoRA targets of `tower` when the options name none (see `DEFAULT_TARGET_MODULES`).

    None lets peft pick by model type (its own table); raises naming `key` when neither knows the tower.
    """
    names = _layer_names(tower)
    for candidates in DEFAULT_TARGET_MODULES:
        if all(name in names for name in candidates):
            return list(candidates)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return None
    raise _recipe_error(
        f"{key}.target_modules: no default for a {model_type!r} tower; name some of its layers, e.g. "
        f"{sorted(names)}"
    )


def add_lora(tower: nn.Module, options: Mapping[str, Any], key: str = "lora") -> nn.Module:
    """Inject LoRA adapters (`peft.LoraConfig(**options)`) into `tower` in place; return `tower`.

    Only the adapters (and biases, with peft's `bias` option) of the tower stay trainable. `key` names
    the recipe entry in errors.
    """
    try:
        import peft
    except ImportError:
        raise _recipe_error(f"{key} needs peft: pip install 'granalign[train]' (or 'peft>=0.11')") from None
    options = dict(options)
    if options.get("modules_to_save"):
        raise _recipe_error(
            f"{key}.modules_to_save is not supported (it cannot be merged on save); train that tower fully"
        )
    if options.get("target_modules") is None:
        options["target_modules"] = default_target_modules(tower, key)
    try:
        config = peft.LoraConfig(**options)
        peft.inject_adapter_in_model(config, tower)
    except (TypeError, ValueError) as err:
        raise _recipe_error(f"{key}: {err}") from None
    return tower


def _tuner_layer_class() -> type | None:
    """peft's adapter-layer base class, or None when peft was never imported (then no module holds
    adapters, and importing it just to find none would cost seconds)."""
    utils = sys.modules.get("peft.tuners.tuners_utils")
    return None if utils is None else utils.BaseTunerLayer


def adapter_parameter_ids(module: nn.Module) -> set[int]:
    """Ids of the adapter parameters peft injected into `module` (LoRA A/B, DoRA magnitudes, ...)."""
    tuner = _tuner_layer_class()
    ids: set[int] = set()
    if tuner is None:
        return ids
    for layer in module.modules():
        if isinstance(layer, tuner):
            for name in layer.adapter_layer_names:
                part = getattr(layer, name, None)
                if isinstance(part, nn.Module):
                    ids.update(id(p) for p in part.parameters())
                elif isinstance(part, nn.Parameter):
                    ids.add(id(part))
    return ids


def _owner(key: str, layers: Mapping[str, nn.Module]) -> str | None:
    """The name of the adapted layer `key` belongs to (longest matching prefix), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return prefix
    return None


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """`model`'s state dict with every peft adapter merged into its base layer, under plain key names
    (`...query.weight`, not `...query.base_layer.weight` + `...lora_A...`); None when it has no adapter.

    `model` is left untouched: each adapted layer is merged in a deep copy of that layer alone (peak
    extra memory: one layer), with peft's own `merge` (LoRA, rsLoRA, DoRA alike).
    """
    tuner = _tuner_layer_class()
    if tuner is None:
        return None
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, tuner)}
    if not layers:
        return None
    merged: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in model.state_dict().items():
        owner = _owner(key, layers)
        if owner is None:
            merged[key] = value
            continue
        if owner in done:
            continue
        done.add(owner)
        layer = copy.deepcopy(layers[owner])
        layer.merge(safe_merge=True)
        for name, tensor in layer.get_base_layer().state_dict().items():
            merged[f"{owner}.{name}"] = tensor
    leftover = [k for k in merged if ".base_layer." in k or ".lora_" in k]
    if leftover:  # pragma: no cover - a peft layer type this merge does not know
        raise RuntimeError(f"could not merge the adapters of {leftover[:3]}")
    return merged


# ------------------------------------------------------------------------------ gradient checkpointing
def enable_gradient_checkpointing(model: GranAlignModel) -> GranAlignModel:
    """Turn on (non-reentrant) gradient checkpointing in the towers of `model`; return it.

    Warns about a tower that has no checkpointable layer (it then keeps its activations).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the activation_checkpointing_* names
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Only reentrant checkpointing needs inputs that require grad; these hooks would also make a frozen
    # tower's outputs require grad, so that the backward pass ran through it for nothing.
    model.disable_input_require_grads()
    for key, tower in (("vision", model.vision_model), ("text", model.text_model)):
        if tower is not None and not any(
            getattr(m, "gradient_checkpointing", False) for m in tower.modules()
        ):
            warnings.warn(
                f"model.gradient_checkpointing: the {key} tower ({tower.config.model_type}) has no "
                "checkpointable layer and keeps its activations",
                stacklevel=2,
            )
    return model
