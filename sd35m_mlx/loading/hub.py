"""Hugging Face Hub repo ids: fetch only the diffusers-layout files we load, into the standard HF cache.

huggingface_hub itself honours HF_HOME / HF_HUB_CACHE, HF_TOKEN (or `hf auth login`) and HF_HUB_OFFLINE
(offline, `snapshot_download` answers from the cache), so nothing here overrides them; this module
chooses the files and turns the hub's exceptions into one line that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..defaults import DEFAULT_MODEL as DEFAULT_REPO

# Non-variant names only (no `*.fp16.safetensors`), safetensors only (never .bin/.pt/.ckpt pickles).
_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model-?????-of-?????.safetensors",
    "model.safetensors",
    "model-?????-of-?????.safetensors",
)
_TOKENIZER_FILES = ("*.json", "*.txt", "*.model")  # vocab/merges (CLIP), spiece.model + tokenizer.json (T5)
LOCAL = "or pass a local diffusers-layout folder instead"  # a model's way out without the Hub
# A path ending like this is a missing file, not a repo id.
_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".json")


class ModelSourceError(ValueError):
    """A model source that cannot be fetched; the one-line message says why and what to do."""


def is_hub_id(source: object) -> bool:
    """`owner/name` in the Hub's repo-id syntax and not an existing local path (a local path wins)."""
    if not isinstance(source, str) or source.count("/") != 1 or source.lower().endswith(_FILE_SUFFIXES):
        return False
    if Path(os.path.expanduser(source)).exists():
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def allow_patterns(*, load_t5: bool = True) -> list[str]:
    """What `download` fetches: the diffusers-layout components, not the repo's single-file variants
    (`sd3.5_medium.safetensors`, `text_encoders/`), and no T5 (about 9.5 GB) when it is skipped."""
    suffixes = ("", "_2", "_3") if load_t5 else ("", "_2")
    patterns = ["model_index.json", "scheduler/*.json"]
    for folder in ("transformer", "vae", *(f"text_encoder{s}" for s in suffixes)):
        patterns += [f"{folder}/*.json", *(f"{folder}/{name}" for name in _WEIGHT_NAMES)]
    return patterns + tokenizer_patterns(suffixes)


def tokenizer_patterns(suffixes: tuple[str, ...] = ("", "_2", "_3")) -> list[str]:
    return [f"tokenizer{s}/{name}" for s in suffixes for name in _TOKENIZER_FILES]


def download(repo_id: str, *, revision: str | None = None, load_t5: bool = True) -> Path:
    """The local snapshot folder (diffusers layout) of `repo_id`, downloading what the cache lacks."""
    folder = _snapshot(repo_id, revision, allow_patterns(load_t5=load_t5), load_t5=load_t5)
    if not (folder / "model_index.json").exists():
        raise ModelSourceError(
            f"{repo_id}{_at(revision)} has no model_index.json: not a diffusers-layout repo "
            "(for a single-file checkpoint, download the file and pass its path)"
        )
    return folder


def download_tokenizers(repo_id: str = DEFAULT_REPO, *, revision: str | None = None) -> Path:
    """A snapshot folder holding only model_index.json and tokenizer{,_2,_3}/ (for single-file checkpoints,
    which carry no tokenizer files)."""
    return _snapshot(repo_id, revision, ["model_index.json", *tokenizer_patterns()], load_t5=False)


def download_component(repo_id: str, files: list[str], *, revision: str | None = None, local: str = LOCAL) -> Path:
    """The local snapshot folder of a single-component repo (such as madebyollin/taesd3), fetching only
    `files` (glob patterns); the same one-line errors as `download`, with `local` as the offline way out."""
    return _snapshot(repo_id, revision, files, load_t5=False, local=local)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], *, load_t5: bool, local: str = LOCAL) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        message = explain(e, repo_id, revision, load_t5=load_t5, local=local)
        if message is None:
            raise
        raise ModelSourceError(message) from e


def explain(
    error: BaseException, repo_id: str, revision: str | None, *, load_t5: bool = True, local: str = LOCAL
) -> str | None:
    """One line for a huggingface_hub (or network) failure; None for errors that are not about fetching.
    `load_t5`: T5 was asked for (to say so when it is what an offline cache lacks); `local`: the way out
    without the Hub ("or pass ... instead")."""
    at = _at(revision)
    cache = constants.HF_HUB_CACHE
    if isinstance(error, HfHubHTTPError) and _status(error) == 401 and "Invalid credentials" in _server_says(error):
        return "the Hugging Face token (HF_TOKEN, or from `hf auth login`) is invalid: run `hf auth login` again"
    if isinstance(error, GatedRepoError) or (
        isinstance(error, HfHubHTTPError)
        and not isinstance(error, (RepositoryNotFoundError, DisabledRepoError))
        and _status(error) in (401, 403)
    ):
        return (
            f"{repo_id} is gated: accept the licence at https://huggingface.co/{repo_id} "
            "and log in with `hf auth login` (or set HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id}: no such repo on the Hugging Face Hub (if it is private, log in with "
            "`hf auth login` or set HF_TOKEN)"
        )
    if isinstance(error, DisabledRepoError):
        return f"{repo_id} has been disabled on the Hugging Face Hub: {local}"
    if isinstance(error, RevisionNotFoundError):
        revision = revision or constants.DEFAULT_REVISION
        return f"{repo_id} has no revision {revision!r} on the Hugging Face Hub (give a branch, tag or commit hash)"
    if isinstance(error, LocalEntryNotFoundError) and hasattr(error, "snapshot_path"):  # IncompleteSnapshotError
        missing_t5 = load_t5 and not (Path(error.snapshot_path) / "text_encoder_3").is_dir()
        hint = " (T5 was never downloaded: skip it with --no-t5 / load_t5=False)" if missing_t5 else ""
        return (
            f"{repo_id}{at} is only partly in the Hugging Face cache ({cache}) and the Hub cannot be reached"
            f"{hint}: connect once to complete it"
        )
    # snapshot_download raises LocalEntryNotFoundError "from" what kept it off the Hub
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) else error
    offline = isinstance(cause, OfflineModeIsEnabled) or (cause is None and constants.is_offline_mode())
    if offline:
        return (
            f"{repo_id}{at} is not in the Hugging Face cache ({cache}) and offline mode (HF_HUB_OFFLINE=1) "
            f"forbids downloading it: unset HF_HUB_OFFLINE to download it once, {local}"
        )
    if _is_network_error(cause) or isinstance(error, LocalEntryNotFoundError):
        return (
            f"cannot reach the Hugging Face Hub (no network?) and {repo_id}{at} is not in its cache ({cache}): "
            f"connect once to download it, {local} (HF_HUB_OFFLINE=1 uses the cache alone)"
        )
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub failed to serve {repo_id}{at} (HTTP {_status(error)}): try again later, {local}"
    return None


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _server_says(error: HfHubHTTPError) -> str:
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    return str(headers.get("X-Error-Message") or getattr(error, "server_message", None) or "")


def _is_network_error(error: BaseException | None) -> bool:
    """Connection failures of whichever HTTP client huggingface_hub uses (requests, httpx, httpx2)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException"})
