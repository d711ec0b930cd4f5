"""Atomic, resumable training checkpoints.

Layout under `output_dir`:

    checkpoints/step-000120/   accelerate state (model.safetensors, optimizer.bin, random_states_<rank>.pkl)
                               + trainer_state.json (epoch, step, best metric, scheduler, history)
    checkpoints/latest         name of the newest complete checkpoint (replaced atomically)
    best/                      `save_pretrained` model + processor selected on the dev split

Every directory is written under a temporary name and renamed into place only once complete, so a run
killed at any moment leaves the previous checkpoint intact. Only the newest `keep_last` step
checkpoints are kept. A checkpoint resumes only with the same number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from granalign.training.recipe import RECIPE_FILE

__all__ = [
    "RUN_ARTIFACTS",
    "TrainerState",
    "claim_output_dir",
    "find_latest_checkpoint",
    "load_checkpoint",
    "recover_directory",
    "replace_directory",
    "resolve_resume",
    "save_checkpoint",
    "save_model_dir",
    "warn_recipe_changes",
    "write_text_atomic",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
# What a training run writes into its output_dir (a second run must not mix its files with these).
RUN_ARTIFACTS = (
    CHECKPOINTS,
    "best",
    "final",
    "logs",
    "metrics.json",
    "training_curves.png",
    RECIPE_FILE,
)


def claim_output_dir(output_dir: Path, resume: bool, overwrite: bool, is_main_process: bool = True) -> None:
    """Refuse an `output_dir` holding another run unless resuming it; with `overwrite`, remove that run.

    Only the files a run writes (`RUN_ARTIFACTS`) are looked at and removed; anything else is left.
    """
    if resume:
        return
    found = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} holds another run ({', '.join(found)}): pass --resume to "
            "continue it, --overwrite-output-dir (train.overwrite_output_dir=true) to replace it, or "
            "choose another --output-dir"
        )
    if is_main_process:
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@dataclass
class TrainerState:
    """Where the loop is: `epoch` (0-based, current), `step_in_epoch` (optimizer steps done in it),
    `global_step`, the best dev rSum so far and per-epoch history."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    num_bad_rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)  # {"step", "epoch", "loss", "lr"} rows
    scheduler: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary file and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def writing_directory(tmp: Path, what: str) -> Iterator[None]:
    """Write `tmp` (a temporary directory renamed into place when complete); if writing fails (a full
    disk, a quota), remove it and raise one `OSError` that says what could not be written and that the
    previous copy is intact, instead of a traceback from deep inside torch or safetensors."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:  # torch.save reports ENOSPC as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise OSError(
            f"could not write {what} ({reason}); the partial copy was removed and the previous one is "
            "intact: free some space and run again (with --resume to continue training)"
        ) from None


def replace_directory(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the complete directory `tmp` to `target`, replacing an existing one.

    The old `target` is first renamed to `target.old` (restored by `recover_directory` if the process
    dies before the swap completes), then `tmp` is renamed to `target` and the old one deleted.
    """
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def recover_directory(target: str | os.PathLike[str]) -> None:
    """Undo a swap interrupted by `replace_directory`: bring `target.old` back if `target` is missing."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def find_latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete step checkpoint under `output_dir/checkpoints`, or None."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike[str],
    state: TrainerState,
    scheduler: Any,
    keep_last: int = 1,
) -> Path:
    """Save the accelerate state (model, optimizer, RNG of every process) plus `state` atomically.

    Every process must call it (each saves its RNG state). Returns the checkpoint directory.
    """
    root = Path(output_dir) / CHECKPOINTS
    name = f"step-{state.global_step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with writing_directory(tmp, f"checkpoint {str(final)!r}"):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.scheduler = scheduler.state_dict()
        with writing_directory(tmp, f"checkpoint {str(final)!r}"):
            write_text_atomic(tmp / STATE_FILE, state.to_json())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, name + "\n")
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for stale in steps[: max(0, len(steps) - keep_last)]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: str | os.PathLike[str], scheduler: Any) -> TrainerState:
    """Restore model, optimizer, RNG states and scheduler from `checkpoint`; return its `TrainerState`."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a complete checkpoint (no {STATE_FILE})")
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} has no RNG state for process {accelerator.process_index}: "
            "resume with the number of processes that saved it"
        )
    accelerator.load_state(str(checkpoint))
    state = TrainerState.from_json(state_file.read_text(encoding="utf-8"))
    if state.scheduler:
        restore_scheduler_position(scheduler, state.scheduler)
    return state


def restore_scheduler_position(scheduler: Any, saved: dict[str, Any]) -> None:
    """Resume `scheduler` (a `LambdaLR`) at the saved step, keeping the schedule it was built with.

    The saved state also holds the old schedule (its total length); loading that would, after
    `--set train.epochs=N --resume`, run the extra epochs at the old schedule's final lr (0 for cosine).
    So only the position is restored, and every group's lr is set from the current schedule at that
    step: the same lr as before when the recipe did not change, the recomputed one when it did.
    """
    # `None` for a lambda keeps the current one (LambdaLR restores only the non-None entries)
    scheduler.load_state_dict({**saved, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    step = scheduler.last_epoch
    lrs = [
        base * schedule(step) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def save_model_dir(model: Any, processor: Any, recipe: Any, target: Path, extra: dict[str, Any]) -> None:
    """`save_pretrained` model + processor + recipe (+ JSON extras) into `target`, atomically.

    LoRA adapters (peft) are saved merged into the tower weights (`lora.merged_state_dict`; the live
    `model` keeps its adapters), so `target` loads with plain `from_pretrained`, without peft.
    """
    from granalign.training.lora import merged_state_dict

    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    from granalign.evaluation.protocols import save_metrics_json
    from granalign.training.recipe import save_recipe

    merged = merged_state_dict(model)  # None: no adapters, save as is
    with writing_directory(tmp, f"the model {str(target)!r}"):
        model.save_pretrained(tmp, **({} if merged is None else {"state_dict": merged}))
        processor.save_pretrained(tmp)
        save_recipe(recipe, tmp / RECIPE_FILE)
        for name, payload in extra.items():
            save_metrics_json(payload, tmp / name)
    replace_directory(tmp, target)


def warn_recipe_changes(accelerator: Any, recipe: Any, previous: Path) -> None:
    """On resume, name the recipe keys that differ from the run's saved recipe (max_steps aside)."""
    if not previous.is_file():
        return
    from granalign.training.recipe import load_recipe

    before, now = load_recipe(previous).flat_dict(), recipe.flat_dict()
    changed = sorted(
        k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k != "train.max_steps"
    )
    if changed:
        accelerator.print(
            f"warning: resuming with a changed recipe ({', '.join(changed)}); the run may not "
            "match an uninterrupted one"
        )


def resolve_resume(resume: bool | str | os.PathLike[str], output_dir: Path) -> Path | None:
    """The checkpoint to resume from: None (fresh start), the latest under `output_dir` (`resume=True`,
    None if there is none yet), or the given checkpoint / run directory (which must exist)."""
    if not resume:
        return None
    if resume is True:
        return find_latest_checkpoint(output_dir)  # nothing yet: start from scratch
    path = Path(resume)
    found = find_latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if found is None or not found.is_dir():
        raise FileNotFoundError(f"no checkpoint to resume from at {str(path)!r}")
    return found
