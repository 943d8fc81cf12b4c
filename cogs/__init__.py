"""Discord glue, one cog per area: chat, personas, admin. Cogs share only the bot's attributes."""
