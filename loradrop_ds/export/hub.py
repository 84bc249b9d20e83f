"""Uploading an export to a Hub model repository; the token is never printed or logged."""

from __future__ import annotations

import os
from typing import Optional

from .errors import ExportError


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True, token: Optional[str] = None) -> str:
    """Create (private by default) or update a Hub model repository from ``folder``.

    The token comes from ``token``, ``HF_TOKEN`` or the user's ``hf auth login``;
    it is never printed or logged. Failure (no network, no permission) raises
    ExportError and leaves the local export untouched."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from e
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload LoRA-drop export (loradrop_ds)")
    except Exception as e:  # network, auth and HTTP errors come in many types
        # The message names the failure class only: exception texts can echo request headers.
        status = getattr(getattr(e, "response", None), "status_code", None)
        login = (" (not logged in, or the token may not write there: hf auth login, or set HF_TOKEN)"
                 if status in (401, 403) or type(e).__name__ == "LocalTokenNotFoundError" else "")
        raise ExportError(f"could not push to the Hub repository {repo_id!r} ({type(e).__name__}){login}; the local "
                          f"export in {folder} is complete: push it later with hf upload {repo_id} {folder}") from None
    return str(getattr(commit, "commit_url", repo_id))
