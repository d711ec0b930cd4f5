"""`train.ema_decay`: the moving average equals a hand-written reference, is what dev selection saves, and
survives an interrupted-and-resumed run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import MICRO_RECIPE

from granalign.training.checkpoint import find_latest_checkpoint
from granalign.training.ema import WeightEMA, num_updates_until_decay
from granalign.training.loop import train
from granalign.training.recipe import recipe_from_dict


def test_ema_follows_the_warmed_up_reference_and_swaps_weights_in_and_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen: never averaged
    ema = WeightEMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    reference = {name: value.clone() for name, value in ema.shadow.items()}
    for t in range(30):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        decay = min(0.9, (1 + t) / (10 + t))
        params = dict(model.named_parameters())
        reference = {name: decay * value + (1 - decay) * params[name] for name, value in reference.items()}
        ema.update(model)
    for name, value in reference.items():
        torch.testing.assert_close(ema.shadow[name], value)
    raw = {name: param.detach().clone() for name, param in model.named_parameters()}
    with ema.applied(model):
        torch.testing.assert_close(model[0].weight, reference["0.weight"])
        assert torch.equal(model[1].weight, raw["1.weight"])
    assert all(torch.equal(param, raw[name]) for name, param in model.named_parameters())
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\), got 1.0"):
        WeightEMA(model, 1.0)


def test_bias_corrected_ema_is_the_normalised_exponential_average_of_the_updates_so_far() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = WeightEMA(model, decay=0.95, warmup="bias_correction")
    history = []
    for _ in range(40):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update(model)
        weights = torch.tensor([0.95 ** (len(history) - 1 - s) for s in range(len(history))])
        expected = sum(w * h for w, h in zip(weights, history, strict=True)) / weights.sum()
        torch.testing.assert_close(ema.shadow["weight"], expected)  # the initial weights never count
    assert ema.current_decay() == pytest.approx(1 - 0.05 / (1 - 0.95**41))  # tends to 0.95
    restored = WeightEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert (restored.warmup, restored.decay, restored.current_decay()) == (
        "bias_correction",
        0.95,
        ema.current_decay(),
    )
    with pytest.raises(ValueError, match=r"EMA warm-up must be one of .* got 'linear'"):
        WeightEMA(model, 0.9, warmup="linear")


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.98, 0.99, 0.995])
def test_num_updates_until_decay_is_where_the_warm_up_reaches_the_decay(decay: float) -> None:
    ema = WeightEMA(torch.nn.Linear(1, 1), decay)
    holds = num_updates_until_decay(decay, "num_updates")
    ema.num_updates = holds
    assert ema.current_decay() == decay
    ema.num_updates = holds - 1
    assert ema.current_decay() < decay
    assert num_updates_until_decay(decay, "bias_correction") == 0


def _recipe(output_dir: Path, **train_overrides):
    data = json.loads(json.dumps(MICRO_RECIPE))
    data["output_dir"] = str(output_dir)
    data["train"].update({"ema_decay": 0.8, "log_with": "none", **train_overrides})
    return recipe_from_dict(data)


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path: Path) -> None:
    reference = train(_recipe(tmp_path / "whole"))
    state = torch.load(
        find_latest_checkpoint(tmp_path / "whole") / "custom_checkpoint_0.pkl", weights_only=False
    )
    assert state["num_updates"] == reference.global_step
    raw = load_file(find_latest_checkpoint(tmp_path / "whole") / "model.safetensors")
    name = next(key for key in state["shadow"] if key.endswith("visual_projection.weight"))
    assert not torch.equal(state["shadow"][name], raw[f"model.{name}"])  # the average, not the raw weights
    first = train(_recipe(tmp_path / "split", max_steps=13))
    assert first.interrupted
    resumed = train(_recipe(tmp_path / "split"), resume=True)
    assert resumed.test_metrics["metrics"] == pytest.approx(reference.test_metrics["metrics"])
    whole, split = (
        load_file(tmp_path / "whole/final/model.safetensors"),
        load_file(tmp_path / "split/final/model.safetensors"),
    )
    assert all(torch.equal(whole[key], split[key]) for key in whole)
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \(0, 1\) or null, got 1.5"):
        _recipe(tmp_path / "bad", ema_decay=1.5).validate()
    with pytest.raises(ValueError, match=r"train\.ema_warmup"):
        _recipe(tmp_path / "bad", ema_warmup="linear")


def test_bias_corrected_ema_run_resumes_exactly(tmp_path: Path) -> None:
    whole = train(_recipe(tmp_path / "whole", ema_warmup="bias_correction", save_checkpoints=False))
    assert train(_recipe(tmp_path / "split", ema_warmup="bias_correction", max_steps=13)).interrupted
    resumed = train(_recipe(tmp_path / "split", ema_warmup="bias_correction"), resume=True)
    assert resumed.test_metrics["metrics"] == pytest.approx(whole.test_metrics["metrics"])
    plain = train(_recipe(tmp_path / "plain", save_checkpoints=False))
    assert plain.test_metrics["metrics"] != pytest.approx(whole.test_metrics["metrics"])  # another average
