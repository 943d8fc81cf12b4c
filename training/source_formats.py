"""Source formats: one raw record of a public instruction set -> `Record`s.

Every public instruction set has its own field names. They are all mapped onto one `Record`: an
Alpaca triple (instruction, input, output), or a multi-turn conversation for ShareGPT-style data,
which is kept as several turns so the model learns every assistant reply in context. A record
that does not have the shape its format promises raises `BadRecord`; the reader
(`training.sources`) reports it with its position and goes on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from typing import Any

from training.records import Message, Record


class BadRecord(ValueError):
    """A record that does not have the shape its format promises."""


def _text(raw: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is {type(value).__name__}, not text")
    return value.strip()


def _single(source: str, instruction: str, context: str, output: str) -> Record:
    if not instruction:
        raise BadRecord("empty instruction")
    return Record(source, instruction, context, output)


def _instructed(raw: dict[str, Any], source: str, answer: str) -> list[Record]:
    """One record from `instruction`, an optional `input` and the answer in field `answer`."""
    instruction, context = _text(raw, "instruction"), _text(raw, "input", required=False)
    return [_single(source, instruction, context, _text(raw, answer))]


def norm_alpaca(raw: dict[str, Any], source: str) -> list[Record]:
    """Alpaca, GPT-4-LLM, CodeAlpaca (instruction, input, output); WizardLM (no input)."""
    return _instructed(raw, source, "output")


def norm_response(raw: dict[str, Any], source: str) -> list[Record]:
    """GPTeacher (instruction, input, response) and Airoboros (instruction, response)."""
    return _instructed(raw, source, "response")


def norm_camel(raw: dict[str, Any], source: str) -> list[Record]:
    """Camel-AI: message_1 is the question, message_2 the answer."""
    return [_single(source, _text(raw, "message_1"), "", _text(raw, "message_2"))]


#: What Unnatural Instructions writes in `constraints` when there are none.
_NO_CONSTRAINTS = {"", "none", "none.", "n/a"}


def norm_unnatural(raw: dict[str, Any], source: str) -> list[Record]:
    """Unnatural Instructions: one task with several instances (and reformulations).

    Each instance becomes one Alpaca record whose instruction is the instance's own
    `instruction_with_input` (the task with this input written in), followed by its
    `constraints` when it has real ones. The task-level `instruction` is a template (the
    reformulations' ones hold an `{INPUT}` placeholder), used only for an instance without
    `instruction_with_input`: the placeholder is filled, else the input goes in the Input block.
    """
    task = _text(raw, "instruction", required=False)
    items = list(raw.get("instances") or []) + list(raw.get("reformulations") or [])
    if not isinstance(raw.get("instances"), list) or not items:
        raise BadRecord("no instances")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRecord("an instance is not an object")
        given = _text(item, "input", required=False)
        prompt, context = _text(item, "instruction_with_input", required=False), ""
        if not prompt:
            template = _text(item, "instruction", required=False) or task
            if "{INPUT}" in template:
                prompt = template.replace("{INPUT}", given)
            else:
                prompt, context = template, given
        constraints = _text(item, "constraints", required=False)
        if constraints.lower() not in _NO_CONSTRAINTS:
            prompt = f"{prompt}\n\n{constraints}"
        out.append(_single(source, prompt, context, _text(item, "output")))
    return out


USER_ROLES = {"human", "user", "prompter"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model", "gpt4", "gpt-4"}
#: Tool-use speakers (a call and its result): kept as Input blocks, never trained.
TOOL_ROLES = {
    "function_call",
    "function-call",
    "observation",
    "function",
    "function_response",
    "tool",
    "tool_call",
    "tool_calls",
    "tool_response",
    "ipython",
}


def norm_sharegpt(raw: dict[str, Any], source: str) -> list[Record]:
    """ShareGPT / WizardLM-V2: conversations [{from, value}], kept multi-turn.

    Tool turns (`function_call`, `observation`, ...) and a record's `tools` list become Input
    blocks between the turns; a turn with any other unknown speaker is left out and counted, the
    rest of the conversation is kept. A leading assistant greeting and a trailing unanswered user
    turn are trimmed (nothing to learn from them); two user turns in a row, or two replies with
    nothing between them, make the record malformed.
    """
    conv = raw.get("conversations", raw.get("conversation"))
    if not isinstance(conv, list) or not conv:
        raise BadRecord("missing conversations")
    system = ""
    turns: list[Message] = []
    skipped: Counter[str] = Counter()
    if (tools := raw.get("tools")) and isinstance(tools, str | list | dict):
        text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        turns.append(Message("input", text.strip(), "tools"))
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} is not an object")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        text = _text(turn, "value" if "value" in turn else "content")
        if who == "system":
            system = text
        elif who in USER_ROLES:
            turns.append(Message("user", text))
        elif who in ASSISTANT_ROLES:
            turns.append(Message("assistant", text))
        elif who in TOOL_ROLES:
            turns.append(Message("input", text, who))
        else:
            skipped[who or "(none)"] += 1
    first_user = next((i for i, m in enumerate(turns) if m.role == "user"), len(turns))
    turns = [m for m in turns[:first_user] if m.role == "input"] + turns[first_user:]
    last_reply = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
    turns = turns[: last_reply + 1]
    spoken = [m.role for m in turns if m.role != "input"]
    replies_back_to_back = any(a.role == b.role == "assistant" for a, b in pairwise(turns))
    if replies_back_to_back or any(a == b == "user" for a, b in pairwise(spoken)):
        raise BadRecord("speakers do not alternate")
    if not turns:
        return [Record(source, conversation=[Message("assistant", "")])]  # reported as empty
    return [Record(source, conversation=turns, system=system, skipped_turns=skipped)]


FORMATS: dict[str, Callable[[dict[str, Any], str], list[Record]]] = {
    "alpaca": norm_alpaca,
    "gpt4-llm": norm_alpaca,
    "codealpaca": norm_alpaca,
    "wizardlm": norm_alpaca,
    "gpteacher": norm_response,
    "airoboros": norm_response,
    "camel": norm_camel,
    "unnatural": norm_unnatural,
    "sharegpt": norm_sharegpt,
    "wizardlm-v2": norm_sharegpt,
}


#: Formats read by their own loader rather than record by record (see `training.sources.load_source`).
MEMORY_FORMAT = "hermes-memory"


def detect_format(raw: dict[str, Any]) -> str:
    """Guess a source's format from the keys of its first record."""
    if "conversations" in raw or "conversation" in raw:
        return "sharegpt"
    if "message_1" in raw and "message_2" in raw:
        return "camel"
    if "instances" in raw:
        return "unnatural"
    if "instruction" in raw and "response" in raw:
        return "gpteacher"
    if "instruction" in raw and "output" in raw:
        return "alpaca"
    if {"role", "content", "persona"} <= raw.keys():
        raise BadRecord(
            "a /admin memory export line: set format: hermes-memory and channels: [id, ...]"
        )
    raise BadRecord(
        f"cannot tell the format from keys {sorted(raw)[:8]}; set format: in the config"
    )
