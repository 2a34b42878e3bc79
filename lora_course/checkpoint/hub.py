"""Hugging Face Hub ids (``org/name``) as checkpoints: download once, then read from the cache.

``lora_course.load("mlx-community/Llama-3.2-1B-Instruct-4bit")`` and ``--model org/name``
come here when no local path of that name exists (a local path always wins).
``huggingface_hub.snapshot_download`` fetches only the files a checkpoint needs
(:data:`ALLOW_PATTERNS`: config, safetensors, tokenizer), into the shared Hub cache, so
transformers and mlx-lm reuse the same copy.

Two environment variables are read here, each time, rather than by huggingface_hub
once at import, so they can change while the program runs (tests do):

- ``HF_HUB_OFFLINE=1``: never touch the network; the cached copy or a one-line error;
- ``HF_HUB_CACHE`` (else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): where the
  cache lives, laid out as ``models--org--name/{refs/main, snapshots/<sha>/, blobs/}``.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

# What lora_course reads from a checkpoint repository; nothing else is downloaded.
ALLOW_PATTERNS = [
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "params.json",
    "consolidated*.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]
# org/name: letters, digits, "-", "_", "."; neither part starts with "." (that is a path).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TRUE = ("1", "ON", "YES", "TRUE")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names the repo and what to do."""


def is_hub_id(name) -> bool:
    """True for a string shaped like ``org/name`` (callers check local paths first)."""
    return isinstance(name, str) and HUB_ID.fullmatch(name) is not None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, but read now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE


def cache_dir() -> Path:
    """The Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id``, downloaded first unless offline or cached."""
    local_only = offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir(),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=local_only,
        )
    except LocalEntryNotFoundError:
        if local_only:
            raise HubError(
                f"{repo_id}: not (completely) in the Hub cache ({cache_dir()}) and HF_HUB_OFFLINE is "
                f"set; unset HF_HUB_OFFLINE, or run `huggingface-cli download {repo_id}` "
                "on a machine with network access and copy the cache"
            ) from None
        raise HubError(
            f"{repo_id}: could not reach the Hugging Face Hub and there is no cached "
            f"copy in {cache_dir()}; check the network, or pass a local path"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such model repository on the Hugging Face Hub (or it is "
            "gated/private: run `huggingface-cli login`); a local path of that name "
            "does not exist either"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(
            f"{repo_id}: download from the Hugging Face Hub failed ({str(e).splitlines()[0]})"
        ) from None
    return Path(folder)
