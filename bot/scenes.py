"""Scenes: several personas sharing one channel, and who of them answers a message.

SillyTavern's group chats, for Discord. A scene is a channel's cast in seating order (stored by
`bot.memory`), with a policy for who speaks when nobody is named: `natural` (each member's
talkativeness as a weight), `list` (round robin in seating order) or `manual` (`/persona scene
next`). Members can be muted without leaving. Everything here is plain logic over names and
text, so the console and the tests can use it without Discord.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bot.memory import Memory
from bot.personas import Persona, PersonaLibrary, fill, persona_key
from bot.store.scenes import SceneMember, SceneState
from bot.textfold import skeleton

POLICIES = ("natural", "list", "manual")
#: SillyTavern's default talkativeness for a card that does not say.
DEFAULT_TALKATIVENESS = 0.5
#: The one-line description of a member in the roster is cut to this many characters.
ROSTER_LINE = 120


@functools.lru_cache(maxsize=1024)
def _word(name: str) -> re.Pattern[str] | None:
    """`name` as a whole word (or phrase) of folded text (`bot.textfold.skeleton`: any case,
    width or look-alike script); never a regex of the user's making. None for a blank name."""
    words = r"\s+".join(re.escape(w) for w in skeleton(name).split())
    return re.compile(rf"(?<!\w){words}(?!\w)") if words else None


@functools.lru_cache(maxsize=256)
def _folded(text: str) -> str:
    return skeleton(text)


def first_mention(text: str, words: Iterable[str]) -> int | None:
    """Where the earliest of `words` appears in `text` as a word, compared case- and
    confusable-folded (`Ѕable` with a Cyrillic Ѕ names Sable); None when none does. The
    position is in the folded text: it orders mentions, it is not an index into `text`."""
    folded = _folded(text)
    hits = [
        m.start()
        for w in words
        if w.strip() and (p := _word(w.strip())) is not None and (m := p.search(folded))
    ]
    return min(hits) if hits else None


def mentions_any(text: str, words: Iterable[str]) -> bool:
    return first_mention(text, words) is not None


def talkativeness(persona: Persona | None, member: SceneMember) -> float:
    """The member's weight: the scene's value, else the card's `extensions.talkativeness`
    (SillyTavern stores it as text), else 0.5; clamped to 0..1."""
    value: object = member.talkativeness
    if value is None and persona is not None:
        value = persona.card.extensions.get("talkativeness")
    try:
        weight = float(value) if value is not None else DEFAULT_TALKATIVENESS  # type: ignore[arg-type]
    except (TypeError, ValueError):
        weight = DEFAULT_TALKATIVENESS
    return min(max(weight, 0.0), 1.0) if weight == weight else DEFAULT_TALKATIVENESS


@dataclass(slots=True)
class Scene:
    """A channel's scene as the reply path uses it: the stored state plus each member's card."""

    state: SceneState
    personas: dict[str, Persona | None]  # by persona_key(member name)

    @property
    def members(self) -> list[SceneMember]:
        return self.state.members

    @property
    def active(self) -> list[SceneMember]:
        """The members who may speak (not muted), in seating order."""
        return [m for m in self.members if not m.muted]

    def __bool__(self) -> bool:
        return bool(self.members)

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str | None) -> SceneMember | None:
        key = persona_key(name or "")
        return next((m for m in self.members if persona_key(m.name) == key), None)

    def named(self, text: str) -> list[SceneMember]:
        """Active members named in `text` (name or nickname as a word, case- and
        confusable-folded), in the order they are first named."""
        found = [
            (at, m.seat, m)
            for m in self.active
            if (at := first_mention(text, [m.name, *m.nicknames])) is not None
        ]
        return [m for _, _, m in sorted(found, key=lambda f: (f[0], f[1]))]

    def roster(self, viewer: str) -> str:
        """Who is present, for `viewer`'s Input block: each member's name and one line about
        them; the scene's scenario after it."""
        lines = []
        for m in self.members:
            persona = self.personas.get(persona_key(m.name))
            about = one_line(persona, viewer) if persona is not None else ""
            you = " (you)" if persona_key(m.name) == persona_key(viewer) else ""
            lines.append(f"- {m.name}{you}" + (f": {about}" if about else ""))
        text = "Characters in this scene:\n" + "\n".join(lines)
        if self.state.scenario.strip():
            text += f"\n\nScene: {self.state.scenario.strip()}"
        return text

    def pick(self, rng: random.Random) -> SceneMember | None:
        """Who speaks when nobody was named, by the scene's policy (None: nobody, e.g. a
        `manual` scene with no one chosen, or everyone muted). `list` and `manual` change
        the state (`next_seat`, `manual_next`); the caller stores it."""
        active = self.active
        if not active:
            return None
        policy = self.state.policy
        if policy == "manual":
            chosen = self.member(self.state.manual_next)
            self.state.manual_next = None
            return chosen if chosen is not None and not chosen.muted else None
        if policy == "list":
            after = [m for m in active if m.seat >= self.state.next_seat] or active
            chosen = after[0]
            self.state.next_seat = chosen.seat + 1
            return chosen
        weights = [talkativeness(self.personas.get(persona_key(m.name)), m) for m in active]
        if sum(weights) <= 0:
            return rng.choice(active)
        return rng.choices(active, weights=weights)[0]


def one_line(persona: Persona, viewer: str) -> str:
    """A persona in one line: the first sentence (or line) of its description."""
    text = fill(persona.card.description, persona.name, viewer)
    first = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0].strip()
    return first if len(first) <= ROSTER_LINE else first[: ROSTER_LINE - 1].rstrip() + "…"


def speakers_for(
    scene: Scene,
    text: str,
    *,
    replied_to: str | None = None,
    pick: bool = False,
    rng: random.Random | None = None,
) -> list[SceneMember]:
    """Who answers a member's message: the cast member whose message it replies to, then the
    ones it names, in the order named; if nobody, and `pick` (an `always` channel, or the bot
    was addressed), one member chosen by the scene's policy."""
    chosen: list[SceneMember] = []
    if (target := scene.member(replied_to)) is not None and not target.muted:
        chosen.append(target)
    for member in scene.named(text):
        if member not in chosen:
            chosen.append(member)
    if not chosen and pick:
        one = scene.pick(rng or random.Random())
        if one is not None:
            chosen.append(one)
    return chosen


def chained(scene: Scene, speaker: str, reply: str, already: Sequence[str]) -> list[SceneMember]:
    """Members a cast member's reply names (never itself, never one in `already` waiting)."""
    own = persona_key(speaker)
    waiting = {persona_key(n) for n in already}
    return [
        m
        for m in scene.named(reply)
        if persona_key(m.name) != own and persona_key(m.name) not in waiting
    ]


async def load_scene(
    memory: Memory, personas: PersonaLibrary | None, channel_id: int, guild_id: int | None
) -> Scene:
    """The channel's scene with each member's card (None for a persona since deleted)."""
    state = await memory.scenes.get(channel_id)
    found: dict[str, Persona | None] = {}
    for m in state.members:
        found[persona_key(m.name)] = await personas.get(m.name, guild_id) if personas else None
    return Scene(state, found)


def member_context(scene: Scene, name: str) -> tuple[list[str], str]:
    """What `Conversations.prepare` needs for member `name`: the other members' names (its
    stops) and the roster text for its Input block. Empty outside a scene."""
    if not scene or scene.member(name) is None:
        return [], ""
    others = [n for n in scene.names() if persona_key(n) != persona_key(name)]
    return others, scene.roster(name)
