"""LoRA towers (peft) and gradient checkpointing as recipe options: what trains, optimizer groups, merged
saving, exact checkpointed gradients, and a micro training run with text LoRA that resumes exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import MICRO_RECIPE, image_inputs, text_inputs, tiny_model, tiny_tokenizer
from transformers import AutoModel

import granalign  # noqa: F401  (registers GranAlign with the Auto classes)
from granalign import GranAlignModel
from granalign.processing_granalign import GranAlignProcessor
from granalign.training.builders import scratch_image_processor
from granalign.training.checkpoint import find_latest_checkpoint, save_model_dir
from granalign.training.loop import train
from granalign.training.lora import (
    DEFAULT_TARGET_MODULES,
    adapter_parameter_ids,
    configure_towers,
    default_target_modules,
)
from granalign.training.optim import build_optimizer, parameter_groups
from granalign.training.recipe import ModelRecipe, Recipe, RecipeError, recipe_from_dict
from granalign.training.step import ContrastiveStep

pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.modeling_layers import GradientCheckpointingLayer

BATCH = 4
LORA = {"r": 4, "lora_alpha": 8}


def _adapted(seed: int = 0, vision: str = "vit", **recipe) -> GranAlignModel:
    """A tiny model configured by `configure_towers` as `ModelRecipe(**recipe)` says."""
    model = tiny_model(vision, "bert", seed=seed)
    torch.manual_seed(seed + 1)  # LoRA A matrices are drawn from the global RNG
    return configure_towers(model, ModelRecipe(**recipe))


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        **image_inputs("vit", BATCH, seed=seed),
        **text_inputs(BATCH, seed=seed),
        "image_ids": torch.arange(BATCH),
    }


def _randomize_lora_b(model: GranAlignModel, seed: int = 5) -> None:
    """peft starts B at zero (adapted = base model); random B makes merging and A's gradients matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _tower(name: str) -> bool:
    return name.startswith(("vision_model.", "text_model."))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- what trains
def test_only_lora_and_grm_parts_train_and_the_frozen_tower_stays_put() -> None:
    model = _adapted(freeze_vision_tower=True, text_lora=LORA)
    lora_names = {n for n, _ in model.named_parameters() if _is_lora(n)}
    assert lora_names and all(n.startswith("text_model.") for n in lora_names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if _tower(n)} == lora_names
    grm = {n for n, p in tiny_model().named_parameters() if p.requires_grad and not _tower(n)}
    assert grm and {n for n in trainable if not _tower(n)} == grm  # the GRM parts train as before

    before = _snapshot(model)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    step = ContrastiveStep(model).train()
    for index in range(3):  # B leaves zero at step 1, so A moves from step 2 on
        optimizer.zero_grad(set_to_none=True)
        step(_batch(index), hardest_negative=False).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad <= trainable
        assert {n for n in with_grad if _tower(n)} == lora_names
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert lora_names <= changed
    assert not {k for k in changed if _tower(k)} - lora_names, "a frozen tower weight changed"
    assert {"visual_projection.weight", "text_projection.weight"} <= changed
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))


def test_lora_parameters_get_the_full_lr_and_tower_weights_the_backbone_lr() -> None:
    model = _adapted(text_lora=LORA)  # vision tower fully tuned, text tower LoRA
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, backbone_lr_multiplier=0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    lora = {id(p) for n, p in model.named_parameters() if _is_lora(n)}
    assert lora == adapter_parameter_ids(model.text_model) and lora <= ids["new_decay"]
    assert groups["new_decay"]["lr"] == 1e-3 and groups["new_decay"]["weight_decay"] > 0
    backbone = ids["backbone_decay"] | ids["backbone_no_decay"]
    assert backbone == {id(p) for p in model.vision_model.parameters() if p.requires_grad}
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert all(len(g["params"]) for g in groups.values())
    # peft's bias="all": the (pretrained) tower biases train too, at the backbone lr.
    biased = _adapted(text_lora={**LORA, "bias": "all"})
    groups = {g["name"]: g for g in parameter_groups(biased, lr=1e-3, backbone_lr_multiplier=0.1)}
    text_bias = {id(p) for n, p in biased.text_model.named_parameters() if n.endswith(".bias")}
    assert text_bias <= {id(p) for p in groups["backbone_no_decay"]["params"]}


@pytest.mark.parametrize("vision", ["vit", "clip_vision_model", "dinov2", "swin", "convnext"])
def test_default_target_modules_fit_each_tower(vision: str) -> None:
    model = tiny_model(vision, "bert")
    targets = default_target_modules(model.vision_model)
    assert tuple(targets) in DEFAULT_TARGET_MODULES
    assert default_target_modules(model.text_model) == ["query", "value"]
    configure_towers(model, ModelRecipe(vision_lora=LORA, text_lora=LORA))
    for tower, expected in ((model.vision_model, targets), (model.text_model, ["query", "value"])):
        adapted = {n.rpartition(".")[2] for n, m in tower.named_modules() if isinstance(m, BaseTunerLayer)}
        assert adapted == set(expected)
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)


def test_lora_option_errors_name_the_recipe_key() -> None:
    with pytest.raises(RecipeError, match=r"model\.text_lora"):
        _adapted(text_lora={"r": 4, "rank": 3})  # not a LoraConfig argument
    with pytest.raises(RecipeError, match=r"model\.text_lora"):
        _adapted(text_lora={"r": 4, "target_modules": ["no_such_layer"]})
    with pytest.raises(RecipeError, match=r"model\.vision_lora\.modules_to_save"):
        _adapted(vision_lora={"r": 4, "modules_to_save": ["layernorm"]})
    with pytest.raises(RecipeError, match="exclude each other"):
        _adapted(freeze_text_tower=True, text_lora=LORA)
    with pytest.raises(RecipeError, match="no vision tower"):
        _adapted(vision=None, vision_lora=LORA)


# ------------------------------------------------------------------------------------------ saving
def _processor(tmp_path: Path) -> GranAlignProcessor:
    image_processor = scratch_image_processor({"image_size": 32})
    return GranAlignProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(tmp_path))


def _scores(model: GranAlignModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.score(model.encode_image(**image_inputs("vit", 3)), model.encode_text(**text_inputs(5)))


def test_saved_dir_is_merged_loads_without_peft_and_scores_like_the_adapted_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _adapted(vision_lora=LORA, text_lora={**LORA, "lora_dropout": 0.1})
    _randomize_lora_b(model)
    adapted_scores = _scores(model)
    live_keys = set(model.state_dict())
    target = tmp_path / "best"
    save_model_dir(model, _processor(tmp_path), Recipe(), target, {})

    saved = load_file(target / "model.safetensors")
    assert not [k for k in saved if "lora_" in k or "base_layer" in k]
    assert not (target / "adapter_config.json").exists()
    base = model.text_model.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.allclose(saved["text_model.encoder.layer.0.attention.self.query.weight"], base)

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails: loading must not need it
    loaded, info = AutoModel.from_pretrained(target, output_loading_info=True)
    monkeypatch.undo()
    assert type(loaded) is GranAlignModel
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.modules())
    torch.testing.assert_close(_scores(loaded), adapted_scores, atol=1e-5, rtol=1e-5)

    # The live model keeps its adapters and keeps training with them.
    assert set(model.state_dict()) == live_keys
    assert torch.equal(base, model.text_model.encoder.layer[0].attention.self.query.base_layer.weight)
    torch.testing.assert_close(_scores(model), adapted_scores, atol=0, rtol=0)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if _is_lora(n)}
    optimizer = build_optimizer(model, lr=1e-2)
    ContrastiveStep(model).train()(_batch(), hardest_negative=False).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if _is_lora(n))


# -------------------------------------------------------------------------- gradient checkpointing
def _count_layer_calls(model: GranAlignModel) -> dict[str, list[int]]:
    """Call counters inside the first checkpointable layer of each tower: a recomputation calls it again.

    (The layer checkpoints its `forward`, so hooks on the layer itself run once; its children run twice.)
    """
    counts: dict[str, list[int]] = {}
    for key, tower in (("vision", model.vision_model), ("text", model.text_model)):
        layer = next(m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer))
        counts[key] = [0]
        next(layer.children()).register_forward_hook(lambda *_, c=counts[key]: c.__setitem__(0, c[0] + 1))
    return counts


def _loss_and_grads(model: GranAlignModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    step = ContrastiveStep(model).train()
    torch.manual_seed(11)  # dropout (BERT's 0.1) and the Gumbel adapters draw from it
    loss = step(_batch(), hardest_negative=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_reaches_the_towers_and_keeps_loss_and_gradients() -> None:
    plain = _adapted(text_lora=LORA)
    checked = _adapted(text_lora=LORA, gradient_checkpointing=True)
    for model in (plain, checked):
        _randomize_lora_b(model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), checked.state_dict().values(), strict=True)
    )
    for tower in (checked.vision_model, checked.text_model):
        layers = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers and all(m.gradient_checkpointing for m in layers)
    assert checked.text_model.encoder.layer[0].gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())

    plain_calls, checked_calls = _count_layer_calls(plain), _count_layer_calls(checked)
    loss, grads = _loss_and_grads(plain)
    checked_loss, checked_grads = _loss_and_grads(checked)
    assert plain_calls == {"vision": [1], "text": [1]}
    assert checked_calls == {"vision": [2], "text": [2]}  # forward + recomputation in the backward pass
    torch.testing.assert_close(checked_loss, loss, atol=1e-6, rtol=1e-6)
    assert checked_grads.keys() == grads.keys()
    assert any(".lora_A." in n for n in grads) and any(n.startswith("vision_model.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_keeps_a_frozen_tower_out_of_the_backward_pass() -> None:
    model = _adapted(freeze_vision_tower=True, gradient_checkpointing=True)
    seen: list[bool] = []
    model.vision_model.register_forward_hook(
        lambda _m, _i, out: seen.append(out.last_hidden_state.requires_grad)
    )
    model.train().encode_image(**image_inputs("vit", 2))
    assert seen == [False]


# ------------------------------------------------------------------------------ micro training run
def _micro(output_dir: Path, **train):
    data = json.loads(json.dumps(MICRO_RECIPE))
    data["output_dir"] = str(output_dir)
    data["model"].update(text_lora={"r": 4, "lora_alpha": 8}, gradient_checkpointing=True)
    data["train"].update(epochs=1, **train)  # 10 optimizer steps
    return recipe_from_dict(data)


@pytest.mark.slow
def test_micro_run_with_text_lora_resumes_exactly_and_exports_merged(tmp_path: Path) -> None:
    reference = train(_micro(tmp_path / "reference"))
    first = train(_micro(tmp_path / "run", max_steps=6))  # mid-epoch, off the checkpoint grid of 4
    assert first.interrupted and first.global_step == 6
    resumed = train(_micro(tmp_path / "run"), resume=True)
    assert resumed.global_step == reference.global_step == 10 and not resumed.interrupted

    last = load_file(find_latest_checkpoint(tmp_path / "run") / "model.safetensors")
    expected = load_file(find_latest_checkpoint(tmp_path / "reference") / "model.safetensors")
    assert any(".lora_A." in k for k in last), "accelerate checkpoints keep the unmerged adapters"
    assert last.keys() == expected.keys()
    assert all(torch.equal(last[k], expected[k]) for k in expected), "resumed weights differ"
    assert resumed.test_metrics["metrics"] == pytest.approx(reference.test_metrics["metrics"])

    final = load_file(resumed.final_dir / "model.safetensors")
    assert not [k for k in final if "lora_" in k or "base_layer" in k]
    loaded = GranAlignModel.from_pretrained(resumed.final_dir)
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.modules())
