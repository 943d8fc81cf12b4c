"""Which OpenAI-compatible server the bot talks to, and each one's names for sampling settings.

Servers agree on the OpenAI fields (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`) and on
nothing else: vLLM reads `repetition_penalty`, llama.cpp's `llama-server` and llama-cpp-python
read `repeat_penalty`, Ollama takes its own options in `options`. None refuses a field it does
not know, so a setting sent under the wrong name is silently ignored (and each server then
applies its own default: llama-cpp-python 1.1, llama-server 1.0). So the kind is told once at
start from what the server reports (`detect_server`), every request carries that kind's names
(`ServerKind.fields`), and a setting the kind cannot take is one warning at start
(`ServerKind.unsupported`).

llama.cpp's server also gets `cache_prompt` and a stable slot per channel (`SlotMap`, sent as
`id_slot`), so a channel's history stays in its slot's KV cache while other channels talk.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bot.engine.base import GenerationParams

log = logging.getLogger(__name__)

#: The sampling settings beyond the OpenAI schema, by their setting name (bot.settings).
EXTRA_SETTINGS = ("top_k", "repetition_penalty")


@dataclass(frozen=True)
class ServerKind:
    """One kind of server: its name, where each extra sampling setting goes in a request (a
    dotted path: `options.repeat_penalty` is `{"options": {"repeat_penalty": ...}}`), and fields
    it always gets."""

    name: str
    label: str
    paths: dict[str, str]
    always: dict[str, Any] = field(default_factory=dict)
    slots: bool = False  # takes `id_slot` (llama.cpp's server)

    @property
    def unsupported(self) -> tuple[str, ...]:
        """The extra settings this kind has no field for."""
        return tuple(s for s in EXTRA_SETTINGS if s not in self.paths)

    def fields(self, params: GenerationParams) -> dict[str, Any]:
        """The request fields for `params`' extra settings, under this kind's names."""
        out: dict[str, Any] = dict(self.always)
        values = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
        for setting, path in self.paths.items():
            value = values[setting]
            if setting == "top_k" and value <= 0:
                if self.name not in LLAMA_KINDS:
                    continue  # unset is off; llama.cpp's unset is 40, its off is 0
                value = 0
            *parents, leaf = path.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return out

    def reach(self) -> str:
        """One line for `doctor` and the log: which settings reach the server, and as what."""
        sent = ", ".join(f"{s.upper()} as {p}" for s, p in self.paths.items())
        line = f"{self.label}: MAX_NEW_TOKENS, TEMPERATURE, TOP_P, seed and stops as OpenAI fields"
        line += f"; {sent}" if sent else ""
        if self.unsupported:
            line += f"; not taken: {', '.join(s.upper() for s in self.unsupported)}"
        return line


#: llama.cpp applies min_p 0.05 by default; the bot's other engines have no min-p, so it is off.
_LLAMA_ALWAYS: dict[str, Any] = {"min_p": 0.0}

KINDS: dict[str, ServerKind] = {
    k.name: k
    for k in (
        ServerKind("vllm", "vLLM", {"top_k": "top_k", "repetition_penalty": "repetition_penalty"}),
        ServerKind(
            "llama.cpp",
            "llama.cpp server",
            {"top_k": "top_k", "repetition_penalty": "repeat_penalty"},
            {**_LLAMA_ALWAYS, "cache_prompt": True},
            slots=True,
        ),
        ServerKind(
            "llama-cpp-python",
            "llama-cpp-python server",
            {"top_k": "top_k", "repetition_penalty": "repeat_penalty"},
            dict(_LLAMA_ALWAYS),
        ),
        ServerKind(
            "ollama",
            "Ollama",
            {"top_k": "options.top_k", "repetition_penalty": "options.repeat_penalty"},
        ),
        # Unknown: vLLM's names (the most common extension); a server that refuses them with
        # 4xx naming the field gets standard fields only from then on (OpenAIEngine._refuse).
        ServerKind(
            "other",
            "an OpenAI-compatible server of unknown kind",
            {"top_k": "top_k", "repetition_penalty": "repetition_penalty"},
        ),
    )
}
LLAMA_KINDS = ("llama.cpp", "llama-cpp-python")
#: What /v1/models reports as `owned_by`, per kind.
_OWNERS = {"vllm": "vllm", "llamacpp": "llama.cpp", "me": "llama-cpp-python"}


@dataclass
class Detected:
    """What `detect_server` found: the kind, the evidence, and llama.cpp's slot count."""

    kind: ServerKind
    evidence: str
    slots: int = 0
    models: list[str] = field(default_factory=list)


async def detect_server(session: aiohttp.ClientSession, base_url: str) -> Detected:
    """Tell the server kind from `/v1/models` (`owned_by`, the `Server` header), llama.cpp's
    `/props` and Ollama's `/api/version`. Never raises: an unreachable server is `other`."""
    root = base_url.rstrip("/").removesuffix("/v1")
    models, owners, server = await _models(session, base_url)
    props = await _get_json(session, f"{root}/props")
    found = Detected(KINDS["other"], "no marker of a known server", models=models)
    owner_kinds = [_OWNERS[o] for o in owners if o in _OWNERS]
    if "llama.cpp" in server.lower() or (props and "default_generation_settings" in props):
        found = Detected(KINDS["llama.cpp"], "Server: llama.cpp / /props", models=models)
        found.slots = int((props or {}).get("total_slots") or 0)
    elif owner_kinds:
        found = Detected(KINDS[owner_kinds[0]], f"owned_by {owners[0]!r}", models=models)
    elif (version := await _get_json(session, f"{root}/api/version")) and "version" in version:
        found = Detected(KINDS["ollama"], f"/api/version {version['version']}", models=models)
    return found


async def _models(
    session: aiohttp.ClientSession, base_url: str
) -> tuple[list[str], list[str], str]:
    try:
        async with session.get(f"{base_url}/models", timeout=_PROBE) as resp:
            server = resp.headers.get("Server", "")
            if resp.status != 200:
                log.warning("%s/models answered HTTP %s", base_url, resp.status)
                return [], [], server
            data = (await resp.json(content_type=None)).get("data") or []
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
        log.warning("OpenAI-compatible server at %s not reachable yet: %s", base_url, exc)
        return [], [], ""
    names = [str(m.get("id")) for m in data if isinstance(m, dict)]
    owners = [str(m.get("owned_by", "")) for m in data if isinstance(m, dict)]
    return names, owners, server


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url, timeout=_PROBE) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
            return body if isinstance(body, dict) else None
    except (aiohttp.ClientError, TimeoutError, ValueError, asyncio.CancelledError):
        return None


_PROBE = aiohttp.ClientTimeout(total=5)


class SlotMap:
    """A stable llama.cpp server slot per channel: the channel's last slot while it is free,
    else the least recently used free slot; none (the server picks) when every slot is busy."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._owner: OrderedDict[int, str] = OrderedDict()  # slot -> channel, oldest use first
        self._busy: set[int] = set()

    def acquire(self, key: str | None) -> int | None:
        if self.slots <= 0 or key is None:
            return None
        mine = next((s for s, k in self._owner.items() if k == key), None)
        if mine is None or mine in self._busy:
            free = [s for s in range(self.slots) if s not in self._busy]
            if not free:
                return None
            unowned = [s for s in free if s not in self._owner]
            mine = unowned[0] if unowned else next(s for s in self._owner if s in free)
        self._owner.pop(mine, None)
        self._owner[mine] = key
        self._busy.add(mine)
        return mine

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self._busy.discard(slot)
