"""Render many SVG files in worker processes, each within a time limit.

Workers are forked where the platform allows (they start at once, without re-importing the package),
render one `(svg_path, png_path)` job at a time with the caller's `render(svg_path, png_path, image_size)`
function (for example `svg_render.render_file` with the source's scale bound), and reset cairo's static
caches after each file. A worker that runs past the timeout or dies is killed and replaced, and its
half-written PNG removed; the result of that job records the failure.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from .svg_render import require_cairosvg, reset_static_caches, tmp_path

Render = Callable[[str, str, int], tuple[str, str]]
"""`render(svg_path, png_path, image_size)` -> `("ok", pixel hash)` or `("error", message)`."""

PROGRESS_EVERY = 500
"""`progress(done, total)` is called after every this many files."""


def check_render_options(image_size: int, num_proc: int, timeout: float) -> None:
    """Validate the rendering options of a loader: PNG side, worker processes, seconds per file."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be an int >= 1, got {num_proc!r}")
    if not timeout > 0:
        raise ValueError(f"render_timeout must be > 0 seconds, got {timeout!r}")


def _worker(conn: Connection, render: Render, image_size: int) -> None:
    """Worker loop: say "ready", then render `(svg_path, png_path)` jobs until `None`, resetting cairo's
    static caches (fonts) after each file so every render equals a fresh-process render."""
    require_cairosvg()
    gc.freeze()  # what the worker inherited (torch, datasets, ...) is not rescanned by each gc.collect()
    conn.send(("ready", ""))
    while True:
        job = conn.recv()
        if job is None:
            return
        result = render(*job, image_size)
        reset_static_caches()
        conn.send(result)


def _context() -> Any:
    """`fork` where available: workers start at once, without re-importing the (slow) package."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@dataclass
class _Slot:
    process: Any
    conn: Connection
    index: int | None = None  # the job being rendered
    started: float = 0.0


def _start_worker(context: Any, render: Render, image_size: int) -> _Slot:
    parent, child = context.Pipe()
    process = context.Process(target=_worker, args=(child, render, image_size), daemon=True)
    process.start()
    child.close()
    if not parent.poll(120) or parent.recv()[0] != "ready":
        process.kill()
        raise RuntimeError("an SVG render worker did not start within 120 s")
    return _Slot(process, parent)


def render_in_workers(
    jobs: Sequence[tuple[str, str]],
    render: Render,
    image_size: int,
    num_proc: int,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Render `(svg_path, png_path)` jobs with `render` in `num_proc` worker processes, each file within
    `timeout` s.

    Returns per job `{"pixels": hash}` or `{"error": message}` (plus `"timeout"` for a file stopped at
    the limit). A worker that times out or dies is killed and replaced. Under the `spawn` start method
    `render` must be picklable (a module-level function).
    """
    context = _context()
    pending = deque(range(len(jobs)))
    results: list[dict[str, Any]] = [{} for _ in jobs]
    slots: list[_Slot] = []
    done = 0

    def discard(slot: _Slot) -> None:
        slot.process.kill()
        slot.process.join()
        slot.conn.close()
        if slot.index is not None:  # a half-written PNG of the killed worker
            tmp = tmp_path(jobs[slot.index][1], slot.process.pid)
            if os.path.exists(tmp):
                os.remove(tmp)
        slots.remove(slot)

    try:
        while pending or any(slot.index is not None for slot in slots):
            while pending and len(slots) < num_proc and sum(s.index is None for s in slots) < len(pending):
                slots.append(_start_worker(context, render, image_size))
            for slot in slots:
                if slot.index is None and pending:
                    slot.index, slot.started = pending.popleft(), time.monotonic()
                    slot.conn.send(jobs[slot.index])
            busy = [slot for slot in slots if slot.index is not None]
            deadline = min(slot.started for slot in busy) + timeout
            ready = wait([slot.conn for slot in busy], timeout=max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for slot in busy:
                index = slot.index
                if slot.conn in ready:
                    try:
                        status, value = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.join(timeout=1)
                        results[index] = {"error": f"render worker died (exit code {slot.process.exitcode})"}
                        discard(slot)
                    else:
                        results[index] = {"pixels": value} if status == "ok" else {"error": value}
                        slot.index = None
                elif now - slot.started >= timeout:
                    results[index] = {"error": f"timed out after {timeout:g} s", "timeout": timeout}
                    discard(slot)
                else:
                    continue
                done += 1
                if progress is not None and done % PROGRESS_EVERY == 0:
                    progress(done, len(jobs))
    finally:
        for slot in list(slots):
            if slot.index is None:
                try:
                    slot.conn.send(None)
                    slot.process.join(timeout=5)
                except OSError:
                    pass
            discard(slot)
    return results
