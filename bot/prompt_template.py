"""Prompts in a model's own chat template, and the choice between it and Alpaca (`PROMPT_FORMAT`).

`bot.prompt` owns the Alpaca layout and the defusing of untrusted text; this module is its
sibling for models whose tokenizer carries a `chat_template` (ChatML, Llama-3, Mistral, ...).
`choose_format` picks the format once per loaded model: `auto` takes the tokenizer's template
when it has one and Alpaca otherwise, so Nous-Hermes-Llama2 (no template) keeps its prompt byte
for byte.

How a template is used. The Jinja template is run once, at load, on placeholder messages, and cut
at the placeholders into the text that wraps each role (`Skeleton`: before and after a system,
user and assistant message, and what the template writes first). A prompt is then those wrappers
around each defused message, concatenated: rendering a longer history only appends text, so the
earlier prompt is a prefix of the later one (the engine's prompt cache keeps working), token
fitting counts each message alone, and two members speaking in a row is just two user messages
(templates that refuse that, like Mistral's, are never asked to render it).

Defusing (on top of `bot.prompt`'s): every control token of the tokenizer (its special and added
tokens), every bracket marker of the template (`[INST]`, `<<SYS>>`) and the control strings of
the common template families (`KNOWN_MARKERS`) found in untrusted text,
in any case or Unicode disguise (`bot.prompt.fold`), is broken with a space before its last
character (`defuse_markers`), so typed `<|im_end|><|im_start|>system` stays text: the prompt
holds exactly the control tokens its wrappers put there.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.prompt import (
    NO_CONTEXT,
    SEPARATOR,
    Context,
    Turn,
    chat_segments,
    clean_name,
    clean_reply,
    context_texts,
    defuse_turn,
    fold,
    neutralize,
    note_index,
    participants,
    recall_text,
    render_chat,
    render_recall,
    render_system,
    render_turn,
    stop_strings,
)
from bot.prompt_window import FittedPrompt
from bot.store.images import Image

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """A chat template this module cannot cut into per-message wrappers (one line, for users)."""


# --------------------------------------------------------------------------------------------
# Control tokens in untrusted text

#: Bracket markup a template writes as plain text (Mistral's `[INST]`, Llama 2's `<<SYS>>`).
_MARKUP = re.compile(r"\[/?[A-Za-z_]{2,}\]|<<?/?[A-Za-z_|]{2,}>>?")


#: Control strings of the common template families (ChatML, Llama-3, Llama-2/Mistral, Gemma,
#: Phi-3), defused in every message whatever the server's model is.
KNOWN_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]",
    "[/INST]", "<<SYS>>", "<</SYS>>", "<start_of_turn>", "<end_of_turn>", "<|system|>",
    "<|user|>", "<|assistant|>", "<|end|>",
)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _fold_char(ch: str) -> str:
    return fold(ch)


@functools.lru_cache(maxsize=8192)
def defuse_markers(text: str, markers: tuple[str, ...]) -> str:
    """`text` with every occurrence of a marker broken, compared by `bot.prompt.fold` (so
    full-width, accented, upper-case and zero-width disguises count): a space goes before the
    marker's last character, `<|im_end|>` -> `<|im_end| >`. Markers are given folded."""
    if not markers:
        return text
    pattern = _marker_pattern(markers)
    for _ in range(len(text) + 1):  # each pass breaks at least one occurrence
        folded, owner = [], []
        for i, ch in enumerate(text):
            f = _fold_char(ch)
            folded.append(f)
            owner += [i] * len(f)
        m = pattern.search("".join(folded))
        if m is None:
            return text
        last = owner[m.end() - 1]
        text = f"{text[:last]} {text[last:]}"
    return text


@functools.lru_cache(maxsize=64)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, sorted(markers, key=len, reverse=True))))


def tokenizer_markers(tokenizer: Any, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The folded control strings of `tokenizer` (special and added tokens with punctuation in
    them, so plain-word added tokens stay readable) plus `extra` (a template's markup)."""
    names = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names |= {str(getattr(tok, "content", tok)) for tok in decoder.values()}
    names |= set(extra)
    out = {fold(n).strip() for n in names}
    return tuple(sorted(m for m in out if len(m) >= 2 and not m.isalnum() and " " not in m))


def user_text(content: str, name: str, speakers: Iterable[str], markers: tuple[str, ...]) -> str:
    """A member's message as a user message's text: `Name: text`, defused as Alpaca's body is
    (`bot.prompt.defuse_turn`) and free of `markers`. The name goes in the text because chat
    templates drop a message's `name` field (SmolLM2's, Llama-3's) and the model must know who
    said what in a channel of many members."""
    shown = defuse_markers(clean_name(name), markers) if name else ""
    body = defuse_turn(content.strip(), tuple(speakers), labelled=bool(shown))
    return defuse_markers(f"{shown}: {body}" if shown else body, markers)


# --------------------------------------------------------------------------------------------
# Cutting a template into wrappers

_PLACE = ("HERMESSYSTEMTEXT", "HERMESUSERONE", "HERMESREPLYONE", "HERMESUSERTWO", "HERMESREPLYTWO")


@dataclass(frozen=True, slots=True)
class Skeleton:
    """The text a template writes around each message (see the module docstring)."""

    opening: str  # before the first message when there is no system message (its default)
    system: tuple[str, str]  # around the first system message (opening included)
    mid_system: tuple[str, str]  # around a later system message (recall, post-history)
    user: tuple[str, str]
    assistant: tuple[str, str]  # (generation prompt, end of turn)
    system_as_user: bool = False  # the template has no system role: system text is a user turn


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _cut(text: str, parts: Sequence[str]) -> list[str] | None:
    """`text` cut at each of `parts` (each exactly once, in order), or None."""
    out, pos = [], 0
    for part in parts:
        i = text.find(part, pos)
        if i < 0 or text.count(part) != 1:
            return None
        out.append(text[pos:i])
        pos = i + len(part)
    return [*out, text[pos:]]


def adds_bos(tokenizer: Any) -> bool:
    """Does `tokenizer` put BOS in front of a text by itself (Llama's do, SmolLM2's does not)?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def skeleton(tokenizer: Any) -> Skeleton:
    """Cut `tokenizer`'s chat template into wrappers; TemplateError when it cannot be done."""
    s, u1, a1, u2, a2 = _PLACE
    chat = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
        {"role": "assistant", "content": a2},
    ]
    try:
        plain = _cut(_render(tokenizer, chat, False), (u1, a1, u2, a2))
        one = _render(tokenizer, chat[:1], False)
        gen = _render(tokenizer, chat[:1], True)
    except Exception as exc:  # a template error is the template's, whatever its type
        raise TemplateError(f"its chat template fails on a plain chat: {exc}") from None
    if plain is None or not gen.startswith(one):
        raise TemplateError("its chat template does not write each message once, in order")
    p0, p1, p2, p3, end = plain
    reply_open = gen[len(one) :]
    if not p2.startswith(end) or not p0.endswith(p2[len(end) :]) or p1 != p3:
        raise TemplateError("its chat template wraps the same role differently in one chat")
    if not p3.endswith(reply_open):
        raise TemplateError("its generation prompt is not what precedes an assistant message")
    user = (p2[len(end) :], p3[: len(p3) - len(reply_open)])
    opening = p0[: len(p0) - len(user[0])]
    system, system_as_user = (opening + user[0], user[1]), True
    try:
        with_sys = _cut(
            _render(tokenizer, [{"role": "system", "content": s}, *chat], False), _PLACE
        )
    except Exception:  # no system role ("System role not supported"): system text as a user turn
        with_sys = None
    if with_sys is not None and with_sys[1].endswith(user[0]) and with_sys[2:] == plain[1:]:
        system = (with_sys[0], with_sys[1][: len(with_sys[1]) - len(user[0])])
        system_as_user = False
    bos = getattr(tokenizer, "bos_token", None) or ""
    if bos and adds_bos(tokenizer):  # the engine's tokenizer writes BOS itself: not twice
        opening = opening.removeprefix(bos)
        system = (system[0].removeprefix(bos), system[1])
    mid = system[0]
    if mid.startswith(opening) and opening:
        mid = mid[len(opening) :]
    elif bos and "bos_token" in str(tokenizer.chat_template) and mid.startswith(bos):
        mid = mid[len(bos) :]
    if system_as_user:
        mid = user[0]
    return Skeleton(opening, system, (mid, system[1]), user, (reply_open, end), system_as_user)


# --------------------------------------------------------------------------------------------
# The formats


class AlpacaFormat:
    """Nous-Hermes-Llama2's Alpaca layout, rendered by `bot.prompt` (the reference format)."""

    name = "alpaca"
    templated = False
    carries_images = False  # text only: images are named (VISION needs the server format)
    reply_open = "### Response:\n"
    reply_end = SEPARATOR
    end_tokens: tuple[str, ...] = ()
    end_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        return "alpaca (### Instruction / ### Response blocks)"

    def head(self, system: str) -> str:
        return render_system(system)

    system_block = head

    def turn_block(
        self, role: str, content: str, name: str = "", speakers: Iterable[str] = ()
    ) -> str:
        return render_turn(role, content, name, speakers)

    def render_recall(
        self, turns: Sequence[Turn], bot_name: str = "", now: float | None = None
    ) -> str:
        return render_recall(turns, bot_name, now)

    def chat_segments(
        self, system: str, turns: Sequence[Turn], **kw: Any
    ) -> list[tuple[str, bool]]:
        return chat_segments(system, turns, **kw)

    def render_chat(self, system: str, turns: Sequence[Turn], **kw: Any) -> str:
        return render_chat(system, turns, **kw)

    def stops(self, other_names: Iterable[str] = ()) -> list[str]:
        return stop_strings(other_names)

    def clean(self, text: str, other_names: Iterable[str] = (), bot_name: str = "") -> str:
        return clean_reply(text, other_names, bot_name)


ALPACA = AlpacaFormat()


class TemplateFormat:
    """A tokenizer's chat template, cut into wrappers (`skeleton`) and filled per message."""

    name = "chat_template"
    templated = True
    carries_images = False  # text only: images are named (VISION needs the server format)

    def __init__(self, tokenizer: Any, *, source: str = "") -> None:
        self.source = source or str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
        self.skel = skeleton(tokenizer)
        sk = self.skel
        wrappers = [*sk.system, *sk.user, *sk.assistant, sk.opening]
        markup = {m for w in wrappers for m in _MARKUP.findall(w)}
        special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {str(getattr(t, "content", t)) for t in decoder.values()}
        self.markers = tokenizer_markers(tokenizer, {*markup, *KNOWN_MARKERS})
        self.reply_open, self.reply_end = sk.assistant
        #: the special tokens that end an assistant turn (`<|im_end|>`, `<|eot_id|>`, `</s>`)
        self.end_tokens = tuple(
            t for t in sorted(special, key=len, reverse=True) if t and t in sk.assistant[1]
        )
        ids = [tokenizer.convert_tokens_to_ids(t) for t in self.end_tokens]
        self.end_ids = tuple(i for i in ids if isinstance(i, int) and i >= 0)
        #: literal strings that mean the model has started another turn
        starts = [t for t in sorted(special) if t and t in sk.user[0]] + sorted(markup)
        self._stop_marks = list(dict.fromkeys([*self.end_tokens, *starts]))

    def describe(self) -> str:
        kind = "ChatML" if "<|im_start|>" in self.skel.user[0] else "chat template"
        return f"chat_template ({kind} from {self.source})"

    # ---- defused pieces --------------------------------------------------------------------

    def defuse(self, text: str) -> str:
        """`bot.prompt.neutralize`, then no control token of this model (`defuse_markers`)."""
        return defuse_markers(neutralize(text), self.markers)

    def _wrap(self, pair: tuple[str, str], body: str) -> str:
        return f"{pair[0]}{body}{pair[1]}"

    def head(self, system: str) -> str:
        """The opening and the first system message (the template's own default when empty)."""
        if not system.strip():
            return self.skel.opening
        return self._wrap(self.skel.system, self.defuse(system.strip()))

    def system_block(self, text: str) -> str:
        """A system message after the history (recall, post-history instructions)."""
        return self._wrap(self.skel.mid_system, self.defuse(text.strip())) if text.strip() else ""

    def user_body(self, content: str, name: str = "", speakers: Iterable[str] = ()) -> str:
        return user_text(content, name, speakers, self.markers)

    def reply_body(self, content: str) -> str:
        """An assistant message's text and its end of turn: what training labels."""
        return f"{self.defuse(content.strip())}{self.reply_end}"

    def turn_block(
        self, role: str, content: str, name: str = "", speakers: Iterable[str] = ()
    ) -> str:
        if role == "assistant":
            return self.reply_open + self.reply_body(content)
        return self._wrap(self.skel.user, self.user_body(content, name, speakers))

    def render_recall(
        self, turns: Sequence[Turn], bot_name: str = "", now: float | None = None
    ) -> str:
        return self.system_block(recall_text(turns, bot_name, now))

    def chat_segments(
        self,
        system: str,
        turns: Sequence[Turn],
        *,
        open_response: bool = True,
        post_history: str = "",
        recall: str = "",
        speakers: Iterable[str] = (),
        context: Context = NO_CONTEXT,
    ) -> list[tuple[str, bool]]:
        """As `bot.prompt.chat_segments`, in this template: target pieces are reply + end of
        turn; the summary, recall, members' cards, a depth-0 author's note and post-history
        are system messages after the history (the history stays a stable prefix)."""
        who = participants(turns, speakers)
        summary, cards, note = context_texts(context, turns, who)
        at = note_index(context, turns) if note else -1
        pieces: list[tuple[str, bool]] = []
        if head := self.head(system):
            pieces.append((head, False))
        for i, turn in enumerate(turns):
            if i == at:
                pieces.append((self.system_block(note), False))
            if turn.role == "assistant":
                if self.reply_open:
                    pieces.append((self.reply_open, False))
                pieces.append((self.reply_body(turn.content), True))
            else:
                pieces.append((self.turn_block("user", turn.content, turn.name, who), False))
        after = [self.system_block(summary), recall, self.system_block(cards)]
        after.append(self.system_block(note) if at == len(turns) else "")
        pieces += [(block, False) for block in after if block]
        if post := self.system_block(post_history):
            pieces.append((post, False))
        if open_response and self.reply_open:
            pieces.append((self.reply_open, False))
        return pieces

    def render_chat(self, system: str, turns: Sequence[Turn], **kw: Any) -> str:
        return "".join(text for text, _ in self.chat_segments(system, turns, **kw))

    def stops(self, other_names: Iterable[str] = ()) -> list[str]:
        """The template's turn markers, then any other participant starting a line."""
        names = dict.fromkeys(clean_name(n) for n in other_names if n)
        return [*self._stop_marks, *(f"\n{n}:" for n in names if n)]

    def clean(self, text: str, other_names: Iterable[str] = (), bot_name: str = "") -> str:
        """`bot.prompt.clean_reply` after cutting at the first turn marker the model wrote."""
        cut = min((i for i in (text.find(m) for m in self._stop_marks) if i >= 0), default=-1)
        return clean_reply(text[:cut] if cut >= 0 else text, other_names, bot_name)


# --------------------------------------------------------------------------------------------
# PROMPT_FORMAT=server
#
# `PROMPT_FORMAT=server`: role messages for a server that applies its own chat template.
#
# llama.cpp's `llama-server` and Ollama (what a CPU-only user runs) template a chat themselves on
# `/v1/chat/completions`. The bot then sends role messages instead of text: one system message
# (system prompt, persona card, lore, scene roster, notes, summary, recalled lines, members'
# cards, the author's note (at whatever depth it is set) and post-history instructions),
# then the history with consecutive messages of one role merged, which every template accepts
# (Mistral's refuses two user messages in a row). The contents are defused exactly as in a rendered
# prompt (`bot.prompt` and `bot.prompt_template.defuse_markers`), against this tokenizer's control
# tokens and the control tokens of the common template families, since the server's template is
# not known here. Token counting and `--show-prompt` use the local rendering (`base`: the
# tokenizer's template, or Alpaca without one), which the server's is close to.


class ServerFormat:
    """Role messages for the server; text and counting delegated to `base`."""

    name = "server"

    def __init__(self, base: AlpacaFormat | TemplateFormat, tokenizer: Any = None) -> None:
        self.base = base
        self.templated = base.templated
        self.markers = tokenizer_markers(tokenizer, KNOWN_MARKERS)

    def __getattr__(self, attr: str) -> Any:  # rendering, stops, cleaning: the base format's
        return getattr(self.base, attr)

    def describe(self) -> str:
        return f"server (role messages to /v1/chat/completions; counted as {self.base.describe()})"

    def defuse(self, text: str) -> str:
        return defuse_markers(neutralize(text.strip()), self.markers)

    #: Chat messages carry image parts (VISION).
    carries_images = True

    def messages(
        self, prompt: FittedPrompt, images: Mapping[int, Sequence[Image]] | None = None
    ) -> list[dict[str, Any]]:
        """`prompt` as role messages; a reopened last reply (continue) ends the list open.
        `images`: a turn id's attached images (VISION), sent as OpenAI image parts after the
        member's text (`{"type": "image_url", "image_url": {"url": "data:..."}}`)."""
        who = participants(prompt.turns, prompt.speakers)
        summary, cards, note = context_texts(prompt.context, prompt.turns, who)
        recalled = recall_text(prompt.recalled)
        system = [prompt.system, summary, recalled, cards, note, prompt.post_history]
        out: list[dict[str, Any]] = []
        if text := "\n\n".join(self.defuse(s) for s in system if s.strip()):
            out.append({"role": "system", "content": text})
        for turn in prompt.turns:
            if turn.role == "assistant":
                role, text = "assistant", self.defuse(turn.content)
            else:
                role, text = "user", user_text(turn.content, turn.name, who, self.markers)
            pictures = (images or {}).get(turn.id or 0, ()) if role == "user" else ()
            content: str | list[dict[str, Any]] = text
            if pictures:
                content = [{"type": "text", "text": text}, *map(image_part, pictures)]
            if out and out[-1]["role"] == role and role != "system":
                out[-1]["content"] = _joined(out[-1]["content"], content)
            else:
                out.append({"role": role, "content": content})
        return out


def image_part(image: Image) -> dict[str, Any]:
    """One image as an OpenAI chat content part, inline as a data URL."""
    return {"type": "image_url", "image_url": {"url": image.data_url()}}


def _joined(
    first: str | list[dict[str, Any]], second: str | list[dict[str, Any]]
) -> str | list[dict[str, Any]]:
    """Two contents of one role as one (a blank line between their texts); parts stay parts."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    a = [{"type": "text", "text": first}] if isinstance(first, str) else list(first)
    b = [{"type": "text", "text": second}] if isinstance(second, str) else list(second)
    if a and b and a[-1]["type"] == "text" and b[0]["type"] == "text":
        return [*a[:-1], {"type": "text", "text": a[-1]["text"] + "\n\n" + b[0]["text"]}, *b[1:]]
    return [*a, *b]


def choose_format(setting: str, tokenizer: Any) -> AlpacaFormat | TemplateFormat:
    """The prompt format for a loaded model's tokenizer (`PROMPT_FORMAT`), decided once.

    `auto`: the chat template when the tokenizer has one that `skeleton` can cut, else Alpaca.
    `chat_template` without a usable template is a TemplateError (one line).
    """
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if setting == "alpaca" or (setting == "auto" and not template):
        return ALPACA
    if setting == "server":  # text for counting: the template if it can be cut, else Alpaca
        return ServerFormat(choose_format("auto", tokenizer), tokenizer)
    if not template:
        raise TemplateError(
            f"PROMPT_FORMAT={setting} needs a tokenizer with a chat_template, and "
            f"{getattr(tokenizer, 'name_or_path', None) or 'this one'} has none; "
            "use PROMPT_FORMAT=alpaca or auto"
        )
    try:
        fmt = TemplateFormat(tokenizer)
    except TemplateError as exc:
        if setting == "auto":
            log.warning("prompt format: Alpaca, because %s", exc)
            return ALPACA
        raise TemplateError(f"PROMPT_FORMAT={setting}: {exc}") from None
    return fmt
