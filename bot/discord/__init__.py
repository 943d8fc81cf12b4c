"""The Discord layer: the only part of `bot/` that imports discord.py.

`client` (HermesBot and `run_bot`), `posting` (how text reaches Discord), `webhooks`, `swipes`,
`checks`, `attachments` and `catchup`. The core (`bot.memory`, `bot.prompt`, `bot.conversation`,
the engine) never imports this package; `cogs/` and `bot.__main__` do. Inside it, `import discord`
still means discord.py: imports are absolute, and this package is `bot.discord`, never `discord`.
"""
