"""Where a MODEL or TOKENIZER setting points: a local folder or a hub id, checked before loading.

`from_pretrained` treats anything that is not an existing folder as a hub id, so a mistyped or
missing folder used to spend most of a minute in the hub client's retries and end with "could
not connect" (or "Repo id must use alphanumeric chars"), never saying the folder is missing.
`resolve_model_source` decides first, in a second or two, and fails with one line:

- a name that looks like a path (starts with `.`, `/` or `~`, holds a backslash or more than one
  `/`, or whose first part is an existing folder) must be an existing folder: "folder not found"
  with the absolute path tried;
- a hub id is used from the local cache when the hub is offline (`HF_HUB_OFFLINE`) or cannot be
  reached; the hub is asked once per process, with a short timeout and no retries.

The engine's loaders call it for the model and the tokenizer, the console and `doctor` before
building an engine, so every way in fails the same way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds to wait for the hub before calling it unreachable.
HUB_TIMEOUT = 5.0

# A hub id: "name" or "owner/name", letters, digits, '-', '_', '.', not starting or ending with
# '-' or '.', no '--' or '..' (huggingface_hub's own rule), at most 96 characters per part.
_HUB_PART = r"(?![.-])(?!.*(?:--|\.\.))[\w.-]{1,96}(?<![.-])"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


_reachable: dict[str, bool] = {}  # hub endpoint -> answered, asked once per process
_warned: set[str] = set()


class ModelSourceError(ValueError):
    """The model or tokenizer cannot be found; the message is one line saying what to do."""


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a local folder (it is not, or cannot be, a hub id)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    first = name.split("/", 1)[0]
    if "/" in name and Path(first).is_dir():  # "models/hermes-7b" where models/ exists
        return True
    return not _HUB_ID.match(name)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """One request to the hub's endpoint per process (no retries); False on any network error."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        try:
            get_session().head(f"{endpoint}/api/models", timeout=timeout)
            _reachable[endpoint] = True
        except Exception as exc:  # DNS, refused, timeout, proxy: all mean "not now"
            log.debug("hub %s not reachable: %s", endpoint, exc)
            _reachable[endpoint] = False
    return _reachable[endpoint]


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of `repo_id` in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a broken cache entry
        return None
    return str(path) if Path(str(path)).is_dir() else None


def how_to_use_a_folder(repo_id: str, what: str) -> str:
    folder = f"models/{repo_id.rsplit('/', 1)[-1]}"
    key = "TOKENIZER" if what == "tokenizer" else "MODEL"
    return f"to use a local folder: hf download {repo_id} --local-dir {folder}, then {key}={folder}"


def resolve_model_source(name: str, what: str = "model") -> str:
    """What to pass to `from_pretrained` for `name`; ModelSourceError (one line) when it cannot work.

    `what` ("model" or "tokenizer") names the thing in the message. An existing folder is
    returned with `~` expanded; a hub id is returned as is when the hub answers or (offline) is
    cached, or as its cached snapshot folder when the hub cannot be reached.
    """
    from huggingface_hub import is_offline_mode

    name = name.strip()
    if not name:
        raise ModelSourceError(f"no {what} given: set MODEL to a model folder or a hub id")
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    absolute = folder.absolute()
    if folder.exists():
        raise ModelSourceError(f"the {what} {name!r} is a file, not a folder: {absolute}")
    if looks_like_path(name):
        raise ModelSourceError(f"{what} folder not found: {absolute}")
    if is_offline_mode():
        if _cached_snapshot(name) is not None:
            return name
        raise ModelSourceError(
            f"cannot load the {what} {name!r}: there is no folder {absolute}, and as a hub id it "
            f"is not in the local Hugging Face cache while HF_HUB_OFFLINE is set; "
            f"{how_to_use_a_folder(name, what)}"
        )
    if hub_reachable():
        return name
    cached = _cached_snapshot(name)
    if cached is not None:
        _warn_once(f"the hub cannot be reached; using the cached copy of {name!r} ({cached})")
        return cached
    raise ModelSourceError(
        f"cannot load the {what} {name!r}: there is no folder {absolute}, and as a hub id it "
        f"is not in the local cache while the hub cannot be reached; "
        f"{how_to_use_a_folder(name, what)}"
    )


def resolve_engine_sources(settings: Any, model: str | None = None) -> tuple[Any, str]:
    """Settings and model name with every local source checked, for `make_engine`.

    The local engine needs the model and the tokenizer (TOKENIZER, else the model's own); the
    OpenAI-compatible engine only the tokenizer, and its server keeps the model's name (a hub id
    resolved to a cached folder must not become OPENAI_MODEL). Raises ModelSourceError.
    """
    from bot.engine_choice import choose_engine

    name = model or settings.model
    kind = choose_engine(settings, name)[0]
    if kind == "llamacpp":  # a .gguf file, read by llama.cpp itself
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"cannot load the model {name!r}: no file {path.absolute()}")
        return settings, str(path)
    if kind == "openai":
        tokenizer = resolve_model_source(settings.tokenizer or name, "tokenizer")
        served = settings.openai_model or name
        return replace(settings, tokenizer=tokenizer, openai_model=served), name
    resolved = resolve_model_source(name, "model")
    if settings.tokenizer:
        settings = replace(
            settings, tokenizer=resolve_model_source(settings.tokenizer, "tokenizer")
        )
    return settings, resolved
