"""Loading tokenizers, configs and weights by hub id or local folder, failing fast and clearly.

`transformers` alone, with no network, retries for most of a minute and then says only that it
could not connect. Here a hub id is first looked up in the local cache (no network at all); if it
is not there, `HF_HUB_OFFLINE` is honoured and the hub endpoint gets one quick connection attempt
before anything is downloaded. Every failure names what was being loaded (tokenizer, model,
dataset), its id, and how to use a local folder instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from bot.gguf import check_gguf, is_gguf

T = TypeVar("T")

PROBE_TIMEOUT_S = 3.0

#: How to point each kind of thing at local files instead.
LOCAL_HINTS = {
    "tokenizer": "pass --tokenizer PATH (a folder with tokenizer.model or tokenizer.json)",
    "model": "set model.name_or_path to a local folder (--set model.name_or_path=PATH)",
    "dataset": "use a local file with --data PATH[:FORMAT]",
}


class HubUnavailable(OSError):
    """Something had to come from the Hugging Face hub, and the hub cannot be reached."""


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not only at import time."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if key in os.environ:  # set now (even to 0) wins over what was read at import
            return os.environ[key].strip().lower() in {"1", "true", "yes", "on"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def unreachable() -> str | None:
    """Why the hub endpoint cannot be reached (one attempt, a few seconds), or None."""
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"


def looks_local(name: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`)."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def require_hub(kind: str, name: str) -> None:
    """Raise `HubUnavailable` (one clear line) unless `name` can be downloaded now."""
    if offline():
        raise HubUnavailable(
            f"cannot load the {kind} {name!r}: HF_HUB_OFFLINE is set and it is not in the local "
            f"cache; {LOCAL_HINTS[kind]}"
        )
    if why := unreachable():
        raise HubUnavailable(
            f"cannot load the {kind} {name!r}: the Hugging Face hub is unreachable ({why}); "
            f"{LOCAL_HINTS[kind]}"
        )


def load(kind: str, name: str, loader: Callable[..., T], **kwargs: Any) -> T:
    """`loader(name, **kwargs)` (a `from_pretrained`) for a local folder, a `.gguf` file, a
    cached hub id, or a hub id downloaded now; never a silent minute of retries."""
    path = Path(name).expanduser()
    if is_gguf(name):  # llama.cpp's one-file format, read (dequantized) by transformers
        if not path.is_file():
            raise FileNotFoundError(f"the {kind} GGUF file {name} does not exist")
        check_gguf(path)  # an unloadable architecture or quantization: one line, at once
        return loader(str(path.absolute().parent), gguf_file=path.name, **kwargs)
    if path.exists():
        return loader(str(path), **kwargs)
    if looks_local(name):
        raise FileNotFoundError(f"the {kind} folder {name} does not exist; {LOCAL_HINTS[kind]}")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not in the cache
    require_hub(kind, name)
    return loader(name, **kwargs)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return load("tokenizer", name, AutoTokenizer.from_pretrained)
