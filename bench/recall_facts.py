"""Planted facts for `bench/recall.py`: things said once, early, and asked about much later.

Each fact is said in a member's own words and asked about later in different words wherever a
keyword search could still find it (the subject noun stays, the verb and framing change): a
name, a date, a number or a preference, 50 of them, each with the answer a reply would need.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Fact:
    said: str  # the message that states the fact
    asked: str  # the much later question about it
    answer: str  # what the fact turn must contain
    long: bool = False  # said inside a long message (`said_at_length`)


_NAMES = ["Biscuit", "Pepper", "Juniper", "Moose", "Clementine", "Waffles", "Tofu", "Pixel"]
_CITIES = ["Tallinn", "Porto", "Kyoto", "Valparaiso", "Tromso", "Ljubljana", "Hobart", "Cusco"]
_MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]

# (statement template, question template): {v} is the value, which the answer must contain.
_TEMPLATES: list[tuple[str, str, str]] = [
    ("name", "btw our new kitten is called {v}, she's tiny", "what did we name the kitten?"),
    ("name", "my grandmother's parrot goes by {v} lol", "what's grandma's parrot called again?"),
    (
        "name",
        "we finally named the sourdough starter: {v}",
        "remind me what the sourdough starter's name was",
    ),
    ("name", "the guild's new mascot is a frog named {v}", "who is the guild mascot?"),
    (
        "name",
        "my car? I call it {v}, it's a rusty hatchback",
        "what nickname did I give my hatchback?",
    ),
    (
        "name",
        "the office fern is named {v} now, don't ask",
        "what's the fern in the office called?",
    ),
    (
        "name",
        "our D&D party's wizard is {v} the Unready",
        "what's the name of the wizard in our D&D party?",
    ),
    ("name", "my brother's band is called {v} and the Static", "what's my brother's band name?"),
    ("name", "the robot vacuum got a name: {v}", "what did I name the vacuum robot?"),
    ("name", "my neighbour's goat is {v}, it ate my hat", "which goat ate my hat?"),
    ("name", "the spare router is labelled {v}", "what's the label on the spare router?"),
    (
        "name",
        "the raid boss we keep wiping on is {v} the Devourer",
        "which raid boss keeps wiping us?",
    ),
    (
        "city",
        "my sister just moved to {v} for her new job",
        "which city did my sister relocate to?",
    ),
    ("city", "our honeymoon will be in {v}", "where are we going for the honeymoon?"),
    (
        "city",
        "the conference this year is held in {v}",
        "where's the conference happening this year?",
    ),
    ("city", "I grew up in {v}, cold winters", "what town did I grow up in?"),
    ("city", "the backup server physically sits in {v}", "where is the backup server located?"),
    ("city", "my pen pal writes from {v}", "where does my pen pal live?"),
    ("city", "the tournament finals are in {v}", "where are the tournament finals?"),
    ("city", "my uncle runs a bakery in {v}", "where is my uncle's bakery?"),
    ("date", "the team offsite is on {v} 14th", "when's the offsite?"),
    ("date", "my passport expires in {v}", "what month does my passport run out?"),
    ("date", "the lease on the flat ends in {v}", "when does the flat lease end?"),
    ("date", "mum's birthday is {v} 3rd, don't let me forget", "when is my mum's birthday?"),
    ("date", "the game's season 2 launches in {v}", "when does season 2 of the game come out?"),
    ("date", "our anniversary is {v} 21st", "what's the date of our anniversary?"),
    ("date", "the dentist appointment got moved to {v} 9th", "when is my dentist appointment now?"),
    ("date", "the server migration is scheduled for {v}", "when are we migrating the server?"),
    ("date", "my driving test is in {v}", "when is my driving test?"),
    ("date", "the vinyl preorder ships in {v}", "when does the vinyl preorder arrive?"),
    ("number", "my locker combination is {v}", "what's the combination for my locker?"),
    ("number", "the wifi guest PIN is {v}", "what was the PIN for guest wifi?"),
    (
        "number",
        "I ran the half marathon in {v} minutes",
        "how many minutes did my half marathon take?",
    ),
    ("number", "the apartment is number {v}", "what's my apartment number?"),
    ("number", "the bug ticket is #{v}", "which ticket number was that bug?"),
    ("number", "my high score in tetris is {v}", "what's my tetris high score?"),
    ("number", "our table at the wedding is {v}", "which table are we at for the wedding?"),
    ("number", "the bike lock code is {v}", "what's the code of the bike lock?"),
    ("number", "the printer's IP ends in .{v}", "what does the printer IP end with?"),
    (
        "number",
        "the parcel tracking number ends {v}",
        "what are the last digits of the parcel tracking number?",
    ),
    ("pref", "I really can't stand {v} in my food", "what food do I hate?"),
    ("pref", "my favourite tea is {v}, always", "which tea do I like best?"),
    ("pref", "I only play {v} in shooters, nothing else", "which role do I play in shooters?"),
    ("pref", "{v} is the best pizza topping, fight me", "what pizza topping do I swear by?"),
    ("pref", "I'm allergic to {v}, careful", "what am I allergic to?"),
    ("pref", "my comfort movie is {v}", "what's my comfort movie?"),
    ("pref", "I'd pick {v} over any other board game", "which board game do I prefer?"),
    ("pref", "my go-to karaoke song is {v}", "what do I sing at karaoke?"),
    ("pref", "I always order {v} at the ramen place", "what do I get at the ramen place?"),
    ("pref", "my favourite font for code is {v}", "which coding font do I like?"),
]
_PREFS = [
    "cilantro",
    "oolong",
    "support",
    "pineapple",
    "hazelnuts",
    "Paddington",
    "Carcassonne",
    "Bohemian Rhapsody",
    "tonkotsu",
    "Iosevka",
]


def planted_facts(rnd: random.Random) -> list[Fact]:
    """The 50 facts of one channel, with values drawn from `rnd` (each value distinctive)."""
    facts = []
    for i, (kind, said, asked) in enumerate(_TEMPLATES):
        if kind == "name":
            value = rnd.choice(_NAMES) + rnd.choice(["", "ster", "o", "ina"])
        elif kind == "city":
            value = rnd.choice(_CITIES)
        elif kind == "date":
            value = rnd.choice(_MONTHS)
        elif kind == "number":
            value = str(rnd.randrange(100, 99999))
        else:
            value = _PREFS[i % len(_PREFS)]
        facts.append(Fact(said.format(v=value), asked, value))
    return facts


#: Words in a long-turn fact's message, around the fact (a Llama 2 token is ~0.75 word here, so
#: 250-600 words are ~350-800 tokens: over the recall budget of a 4096 window, 409 tokens).
LONG_WORDS = (250, 600)


def said_at_length(fact: Fact, rnd: random.Random, vocabulary: Sequence[str]) -> Fact:
    """`fact` said in the middle of a long message of filler `vocabulary`: the whole turn does
    not fit the recall budget, so only an excerpt around the fact can bring it back."""
    n = rnd.randint(*LONG_WORDS)
    words = [rnd.choice(vocabulary) for _ in range(n)]
    at = rnd.randrange(n // 5, 4 * n // 5)
    text = " ".join(words[:at]) + ". Oh and " + fact.said + ". " + " ".join(words[at:])
    return replace(fact, said=text, long=True)
