"""`Engine`: the interface the local and the OpenAI-compatible engine both implement.

`Engine.generate(prompt, params)` returns an `EngineRequest` (`request.py`): an async iterator of
text pieces that can be cancelled and that carries the reply's stats when done. Callers never
know which engine they hold.
"""

from __future__ import annotations

from typing import Any

from bot.engine.base import EngineInfo, FinishHook, GenerationParams
from bot.engine.request import EngineRequest


class Engine:
    """The interface both engines implement.

    `finish_hooks` belongs to the instance: whoever watches replies (the metrics exporter)
    registers on the engine it watches, and a reload hands the hooks on to the new engine
    (`Conversations.set_engine`). Implementations pass the list to each `EngineRequest`.
    """

    info: EngineInfo
    #: the model's tokenizer once started (None for engines without one): the prompt format is
    #: read from it (`bot.prompt_template.choose_format`)
    tokenizer: Any = None
    #: `generate` accepts `messages=` (role messages for a server that applies its own template)
    takes_messages: bool = False

    @property
    def finish_hooks(self) -> list[FinishHook]:
        hooks = self.__dict__.get("_finish_hooks")
        if hooks is None:
            hooks = self.__dict__["_finish_hooks"] = []
        return hooks

    async def start(self) -> None:
        """Load the model or reach the server. Calling it on a started engine does nothing, so a
        caller may start an engine (to read `info`) and then hand it to the bot, which starts
        what it is given."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> EngineRequest:
        raise NotImplementedError

    @property
    def queue_length(self) -> int:
        return 0

    async def complete(self, prompt: str, params: GenerationParams) -> str:
        return await self.generate(prompt, params).text_all()
