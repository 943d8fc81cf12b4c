"""Everything the bot remembers, in one SQLite file: one module per kind of record.

`db` (the connection, WAL, schema version and migrations), `turns` (messages and recall),
`owed` (replies owed, catch-up's reads), `places` (channel and server settings, access),
`personas` (imported cards, the bot's webhooks), `scenes` (scenes and swipes), `notes` (notes,
rolling summaries, members' cards), `audit`.
`bot.memory.Memory` opens the file once and holds one store of each kind.
"""
