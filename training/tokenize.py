"""Records -> token ids and labels, with the prompt text from `bot.prompt` (the one owner of it).

The three rules that decide whether the fine-tune works:

1. Labels are -100 on every prompt token; the target is the reply plus EOS, nothing else.
2. Boundaries are computed on token ids: each piece is tokenised on its own and the ids are
   concatenated (BOS once, at the start). SentencePiece writes `### Response:` as `▁###` at a text
   start but `##`,`#` after a newline, and puts a `▁` before the first word of any text it sees
   alone, so "tokenise the prompt, take its length as the offset" is off by a token or two. Every
   piece here follows a newline, so it is tokenised as `"\\n" + piece` and the newline's ids are
   cut off: the result is exactly the ids of the whole string, which is what the bot feeds the
   model when it serves (checked by the tests on every real record).
3. The EOS the model must learn is never masked: labels are built from the pieces, never by
   masking a pad id, and the pad id is never the EOS id.

Chats are the text the bot serves: user turns carry their speaker's name (`alice: ...`), tool
turns are Input blocks, and a record rendered by the bot's own prompt builders (a persona, the
bot's memory: `Record.segments`) is used piece for piece as it was built.

Multi-turn records train on every assistant turn. `bot.prompt.chat_segments` renders each reply as
body + blank line; here each target is body + EOS, like the single-turn target. In the middle of a
conversation the blank line stays in the input (the bot's history has no EOS in it, only the blank
line) and the EOS is the label at its first newline: the model learns "after this reply comes EOS"
while reading exactly the text the bot will show it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bot.prompt import SEPARATOR, Turn, format_single
from bot.prompt_template import ALPACA, adds_bos, choose_format
from training.data import Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenised record. `labels[i]` is what position i-1 should predict (HF convention)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss (the first label is never predicted, so it is not counted)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def pieces_for(record: Record, fmt: Any = None) -> list[tuple[str, bool]]:
    """The record as (text, is_target) pieces, built by the bot's prompt module.

    A chat is `chat_segments(system, turns)`, names included, which is the bot's prompt up to
    each reply (`fit_prompt` with nothing left out); Input blocks (tool turns) go between the
    turns as `render_system` renders them. `fmt`: a chat template format
    (`bot.prompt_template.TemplateFormat`) renders the same chat in the model's template, where
    a single-turn record is a user message (instruction, then its input) answered by one reply
    and a chat's tool turns are system messages.
    """
    if record.segments is not None:
        return list(record.segments)
    fmt = fmt if fmt is not None and fmt.templated else ALPACA
    if record.conversation is None:
        if not fmt.templated:
            return [(format_single(record.instruction, record.input), False), (record.output, True)]
        ask = "\n\n".join(filter(None, [record.instruction, record.input]))
        return [
            *fmt.chat_segments("", [Turn("user", ask)]),
            (fmt.reply_body(record.output), True),
        ]
    pieces: list[tuple[str, bool]] = []
    if head := fmt.head(record.system):
        pieces.append((head, False))
    opening = 1 if fmt.head("") else 0  # a run's segments start with the template's opening
    run: list[Turn] = []
    for m in [*record.conversation, None]:
        if m is not None and m.role != "input":
            run.append(Turn(role=m.role, content=m.content, name=m.name))
            continue
        if run:
            pieces += fmt.chat_segments("", run, open_response=False)[opening:]
            run = []
        if m is not None and (block := fmt.system_block(m.content)):
            pieces.append((block, False))
    return pieces


def pad_id_for(tokenizer: Any) -> int:
    """A pad id that is not EOS: the tokenizer's pad, else UNK, else 0 (Llama 2 has no pad)."""
    eos = tokenizer.eos_token_id
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0):
        if candidate is not None and candidate != eos:
            return int(candidate)
    raise ValueError("no pad id distinct from EOS")


class Encoder:
    """Tokenises records into `Example`s for one tokenizer, in the prompt format the bot picks
    for it (`prompt_format`, as PROMPT_FORMAT: `auto` is its chat template when it has one).

    In a chat template the prompt pieces hold the template's control tokens (untrusted text in
    them is defused), so they are tokenised with special tokens recognised; a target is the
    reply and the end-of-turn token, which is what the model must learn to emit to stop."""

    def __init__(self, tokenizer: Any, prompt_format: str = "auto") -> None:
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the model could never learn to stop")
        fmt = choose_format("alpaca" if prompt_format == "server" else prompt_format, tokenizer)
        self.fmt: Any = fmt if fmt.templated else None
        self.bos: int | None = tokenizer.bos_token_id
        if self.fmt is not None and not adds_bos(tokenizer):
            self.bos = None  # ChatML on a tokenizer without BOS: the template's text is all
        self.eos: int = tokenizer.eos_token_id
        self.pad: int = pad_id_for(tokenizer)
        self._anchor = self._ids("\n")
        self._warned = False

    def _ids(self, text: str) -> list[int]:
        # split_special_tokens: a literal "</s>" in the data is text, not an EOS (Alpaca; in a
        # template the wrappers' control tokens are meant and the data's were defused).
        split = self.fmt is None
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=split).input_ids)

    def piece_ids(self, text: str, *, at_start: bool) -> list[int]:
        """Ids of `text` as they appear in the whole string: at its start, or after a newline."""
        if at_start or not text:
            return self._ids(text)
        ids = self._ids("\n" + text)
        n = len(self._anchor)
        if ids[:n] == self._anchor:
            return ids[n:]
        if not self._warned:  # a tokenizer that merges across newlines: fall back, boundary kept
            log.warning("tokenizer merges across newlines; pieces are tokenised on their own")
            self._warned = True
        return self._ids(text)

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> Example:
        ids: list[int] = [] if self.bos is None else [self.bos]
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        for i, (text, target) in enumerate(pieces):
            at_start = i == 0
            last = i == len(pieces) - 1
            if target and self.fmt is not None:  # reply + end of turn learnt, what follows not
                end = len(text.rstrip()) if text.endswith(self.fmt.reply_end) else len(text)
                body_ids = self.piece_ids(text[:end], at_start=at_start)
                # the tail follows the end-of-turn token, a control token: tokenised alone
                tail = self.piece_ids(text[end:], at_start=True) if text[end:] else []
                ids += body_ids + tail
                labels += body_ids + [IGNORE_INDEX] * len(tail)
                continue
            if not target:
                piece = self.piece_ids(text, at_start=at_start)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
                continue
            body = text[: -len(SEPARATOR)] if text.endswith(SEPARATOR) else text
            body_ids = self.piece_ids(body, at_start=at_start)
            ids += body_ids
            labels += body_ids
            if last:  # the reply ends the example: EOS is its last input and its last label
                ids.append(self.eos)
                labels.append(self.eos)
            else:  # a reply mid-conversation: keep the blank line as input, learn EOS there
                sep = self.piece_ids(text[len(body) :] or SEPARATOR, at_start=False)
                ids += sep
                labels += [self.eos] + [IGNORE_INDEX] * (len(sep) - 1)
        return Example(ids, labels)

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as the bot's engine counts them (for fitting persona prompts)."""
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def encode(self, record: Record) -> Example:
        return self.encode_pieces(pieces_for(record, self.fmt))

    def measure(self, record: Record) -> tuple[int, int]:
        """(tokens, target tokens): what `training.data.build_mix` needs for lengths and report."""
        ex = self.encode(record)
        return len(ex), ex.n_targets

    def target_spans(self, example: Example) -> list[list[int]]:
        """The label ids of each target run (one per reply), for checks: each ends with EOS."""
        spans: list[list[int]] = []
        current: list[int] = []
        for label in example.labels:
            if label == IGNORE_INDEX:
                if current:
                    spans.append(current)
                    current = []
                continue
            current.append(label)
            if label == self.eos:
                spans.append(current)
                current = []
        if current:
            spans.append(current)
        return spans
