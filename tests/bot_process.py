"""The unmodified bot in a process of its own, for tests that kill it (SIGKILL) mid-reply.

`python -m tests.bot_process API_BASE GATEWAY_URL REPLY`: points discord.py at a fake Discord
(the two class attributes `tests.fake_discord.running_fake` redirects in-process), reads the
bot's settings from the environment (`tests.bot_harness.bot_env`) and serves with a
`ScriptedEngine` that answers REPLY. `bot.discord.client.serve` runs it as `hermes-bot run`
would; a test's SIGKILL stops it anywhere, with no chance to clean up.
"""

from __future__ import annotations

import asyncio
import os
import sys

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.discord.client import HermesBot, serve
from bot.settings import load_settings
from tests.bot_harness import ScriptedEngine


def main(argv: list[str]) -> int:
    api_base, gateway_url, reply = argv
    Route.BASE = api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    settings = load_settings(env=dict(os.environ), env_file=None)
    bot = HermesBot(settings, engine=ScriptedEngine([reply]), guild_ready_timeout=0.05)
    return asyncio.run(serve(settings, bot))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
