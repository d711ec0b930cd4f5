"""Push a training run to the Hub: the final model at the end and, optionally, every saved model on the way.

The training loop calls `on_save(model_dir, step=..., epoch=...)` whenever it writes a loadable model
directory (a `save_pretrained` model + processor, e.g. `output_dir/best` after a new best dev score) and
`on_train_end(final_dir)` once the final model is exported; call both on the main process only.
Intermediate pushes are best-effort (a failure is logged and training goes on); the final push raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .push import PushResult, check_repo_id, push_model_dir, resolve_token

__all__ = ["HubPushCallback"]

logger = logging.getLogger(__name__)


class HubPushCallback:
    """Pushes to `repo_id` (at branch `revision`); the token is resolved at construction so a missing one
    fails before training starts, not after it."""

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        revision: str | None = None,
        every_checkpoint: bool = False,
        endpoint: str | None = None,
        **push_kwargs: Any,
    ) -> None:
        self.repo_id = check_repo_id(repo_id)
        self.token = resolve_token(token)
        self.private, self.revision, self.every_checkpoint = private, revision, every_checkpoint
        self.endpoint = endpoint
        self.push_kwargs = push_kwargs
        self.pushes: list[PushResult] = []
        self.failures: list[str] = []

    def prepare(self) -> str:
        """Create the repo (and branch) now, so a bad token or namespace shows up before training."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        url = api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if self.revision not in (None, "main"):
            api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        return str(url)

    def _push(self, model_dir: str | os.PathLike[str], message: str) -> PushResult:
        result = push_model_dir(Path(model_dir), self.repo_id, token=self.token, private=self.private,
                                revision=self.revision, commit_message=message, endpoint=self.endpoint,
                                **self.push_kwargs)  # fmt: skip
        self.pushes.append(result)
        return result

    def on_save(
        self, model_dir: str | os.PathLike[str], *, step: int, epoch: int | None = None
    ) -> PushResult | None:
        """Push `model_dir` if `every_checkpoint`; never raises (a failed push is logged and recorded)."""
        if not self.every_checkpoint:
            return None
        where = f"step {step}" + (f", epoch {epoch}" if epoch is not None else "")
        try:
            return self._push(model_dir, f"Training in progress: {where}")
        except Exception as err:  # training goes on; the final push will carry the latest model
            self.failures.append(f"{where}: {err}")
            logger.warning("pushing %s to %s failed (%s); training continues", model_dir, self.repo_id, err)
            return None

    def on_train_end(self, final_dir: str | os.PathLike[str]) -> PushResult:
        """Push the final model; errors propagate, saying how to retry."""
        try:
            return self._push(final_dir, "End of training")
        except OSError as err:  # Hub/network errors; the model is saved locally either way
            raise OSError(
                f"pushing {final_dir} to {self.repo_id} failed: {err}\nthe model is saved; retry with "
                f"`granalign push {final_dir} --repo-id {self.repo_id}"
                + (f" --revision {self.revision}`" if self.revision else "`")
            ) from err
