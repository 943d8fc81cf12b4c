"""The bot's core (settings, memory, prompt, personas, policy, conversation, engine) and its
Discord layer (app, replies, webhooks, checks). Only the Discord layer imports discord.py."""
