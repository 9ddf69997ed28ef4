"""Publishing to the Hugging Face Hub: one `create_repo` + one `upload_folder` commit, a token checked up front."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import UsageError

logger = logging.getLogger(__name__)


class MissingTokenError(UsageError):
    """Pushing needs a Hugging Face token and none was found."""


def require_token(repo_id: str, token: str | None = None) -> str:
    """The token to push with (`token`, else the logged-in one / `HF_TOKEN`); checked before any slow work.

    Raises:
        MissingTokenError: with the commands that provide one.
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise MissingTokenError(
            f"pushing to {repo_id!r} needs a Hugging Face token with write access: run 'hf auth login' "
            "(or 'huggingface-cli login'), set HF_TOKEN, or pass --hub_token"
        )
    return token


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` in one commit.

    Returns:
        the commit URL.
    Raises:
        MissingTokenError: when no Hugging Face token is available.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=require_token(repo_id, token))
    repo_url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    logger.info("uploading %s to %s", folder, repo_url)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message or "Upload HySAC",
    )
    return commit.commit_url


__all__ = ["MissingTokenError", "push_folder_to_hub", "require_token"]
