"""End-to-end training on a micro recipe: exact resume, outputs, the CLI, and a 2-process CPU run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import MICRO_RECIPE

from granalign import GranAlignModel
from granalign.cli import main
from granalign.training.checkpoint import find_latest_checkpoint
from granalign.training.loop import train
from granalign.training.recipe import recipe_from_dict, save_recipe

STEPS_PER_EPOCH = 10  # 16 images x 5 captions / (batch 4 x 2 accumulated)


def _recipe(output_dir: Path, **train_overrides):
    data = json.loads(json.dumps(MICRO_RECIPE))
    data["output_dir"] = str(output_dir)
    data["train"].update(train_overrides)
    return recipe_from_dict(data)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("uninterrupted")
    return train(_recipe(output, log_with="tensorboard", log_every_steps=5)), output


def test_run_outputs(uninterrupted) -> None:
    result, output = uninterrupted
    assert result.global_step == 2 * STEPS_PER_EPOCH and not result.interrupted
    summary = json.loads((output / "metrics.json").read_text())
    history = summary["dev_history"]
    assert [h["epoch"] for h in history] == [1, 2]
    best = max(history, key=lambda h: h["rsum"])  # selected on dev, never on test
    assert summary["best_epoch"] == best["epoch"] and summary["best_dev_rsum"] == best["rsum"]
    assert summary["test"]["metrics"]["rsum"] == result.test_metrics["metrics"]["rsum"]
    # Only the newest step checkpoint is kept, and "latest" points at it.
    assert [p.name for p in (output / "checkpoints").glob("step-*")] == ["step-00000020"]
    # final/ holds the dev-selected weights, loadable with from_pretrained, plus processor and recipe.
    final = result.final_dir
    assert final == output / "final"
    best_weights, final_weights = _weights(output / "best"), _weights(final)
    assert all(torch.equal(best_weights[k], final_weights[k]) for k in best_weights)
    model = GranAlignModel.from_pretrained(final)
    assert model.config.num_regions == 3
    assert (final / "processor_config.json").is_file() and (final / "granalign_recipe.yaml").is_file()


def test_tensorboard_logs(uninterrupted) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, output = uninterrupted
    events = EventAccumulator(str(output / "logs" / "micro")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/contrastive_original", "dev/rsum"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("dev/rsum")] == [10, 20]


def test_resume_after_interruption_gives_identical_weights(uninterrupted, tmp_path: Path) -> None:
    _, reference_dir = uninterrupted
    output = tmp_path / "run"
    # Stop mid-epoch 1, off the checkpoint_every_steps grid (so the stop itself saves a checkpoint).
    first = train(_recipe(output, max_steps=STEPS_PER_EPOCH + 3))
    assert first.interrupted and first.final_dir is None and first.global_step == 13
    assert find_latest_checkpoint(output).name == "step-00000013"
    resumed = train(_recipe(output), resume=True)
    assert resumed.global_step == 2 * STEPS_PER_EPOCH
    last = _weights(find_latest_checkpoint(output))
    reference = _weights(find_latest_checkpoint(reference_dir))
    assert last.keys() == reference.keys()
    assert all(torch.equal(last[k], reference[k]) for k in reference), "resumed weights differ"
    assert resumed.test_metrics["metrics"] == pytest.approx(uninterrupted[0].test_metrics["metrics"])


def test_cli_train_evaluate_and_errors(uninterrupted, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, output = uninterrupted
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(output / "final"),
                "--split",
                "test",
                "--output-json",
                str(out_json),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rSum" in printed
    expected = json.loads((output / "metrics.json").read_text())["test"]["metrics"]
    assert json.loads(out_json.read_text())["metrics"] == pytest.approx(expected)

    recipe = save_recipe(_recipe(tmp_path / "never"), tmp_path / "micro.yaml")
    assert main(["train", str(recipe), "--set", "train.epoch=1"]) == 2
    assert "unknown recipe key 'train.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a saved GranAlign model" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(output / "final"),
                "--dataset",
                "builtin",
                "--split",
                "dev",
                "--protocol",
                "coco-9k",
            ]
        )
        == 2
    )
    assert "unknown protocol 'coco-9k'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): global negatives, one result."""
    if shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("the accelerate launcher is not installed next to this python")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    recipe = save_recipe(_recipe(tmp_path / "run", epochs=1, checkpoint_every_steps=0), tmp_path / "r.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "granalign.cli",
        "train",
        str(recipe),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "global batch 16" in done.stdout
    assert "5 steps/epoch" in done.stdout  # 80 pairs / (2 processes x batch 4 x 2 accumulated)
    assert done.stdout.count("i2t R@1  i2t R@5") == 1  # the test table, printed once by the main process
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # The sharded 2-process test evaluation equals a single-process evaluation of the saved model.
    two_process = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["metrics"]
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run" / "final"),
                "--output-json",
                str(tmp_path / "e.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == pytest.approx(two_process)
    checkpoint = find_latest_checkpoint(tmp_path / "run")
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
