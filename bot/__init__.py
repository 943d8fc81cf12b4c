"""The bot's core (settings, memory, prompt, personas, policy, conversation, engine) and its
Discord layer (`bot/discord/`). Only the Discord layer imports discord.py."""
