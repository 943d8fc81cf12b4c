"""training.data: every source format normalised, cleaning counted per reason, problems reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training_helpers import DATA, REAL_FILES, need_data, write_json
from training.config import DataConfig, SourceConfig
from training.data import (
    RECORDS_FILE,
    PrepareError,
    Record,
    SourceStats,
    build_mix,
    read_prepared,
    write_prepared,
)
from training.sources import load_source


def words(rec: Record) -> tuple[int, int]:
    """A tokenizer-free measure: whitespace words (the real one is tested with Llama 2)."""
    targets = sum(len(t.split()) + 1 for t in rec.targets())
    return sum(len(t.split()) for t in rec.texts()) + 2, targets


def load(path: Path, fmt: str = "auto", **kw: object) -> tuple[list[Record], SourceStats]:
    stats = SourceStats("s")
    return list(load_source(SourceConfig(name="s", path=str(path), format=fmt, **kw), stats)), stats


# --- real samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_samples_load(name: str) -> None:
    need_data()
    file, count = REAL_FILES[name]
    raw = json.loads((DATA / file).read_text())
    records, stats = load(DATA / file)
    assert stats.records_in == count == len(records)
    assert not stats.problems and not stats.errors
    first = raw[0]
    if "conversations" in first:
        assert stats.format == "sharegpt"
        assert all(r.is_chat for r in records)
        turns = records[0].conversation
        assert [t.content for t in turns] == [t["value"].strip() for t in first["conversations"]]
        assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    else:
        out_key = "response" if "response" in first else "output"
        assert stats.format == ("gpteacher" if out_key == "response" else "alpaca")
        r = records[0]
        assert (r.instruction, r.input, r.output) == (
            first["instruction"].strip(),
            first["input"].strip(),
            first[out_key].strip(),
        )


# --- every other format, as small synthetic files -------------------------------------------


SYNTHETIC = {
    "alpaca": [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}],
    "gpt4-llm": [{"instruction": "Name a colour.", "input": "", "output": "Blue."}],
    "codealpaca": [{"instruction": "Reverse a list.", "input": "[1, 2]", "output": "[2, 1]"}],
    "wizardlm": [{"instruction": "Explain gravity briefly.", "output": "Mass attracts mass."}],
    "gpteacher": [{"instruction": "Greet me.", "input": "as a pirate", "response": "Ahoy!"}],
    "airoboros": [{"instruction": "Write a haiku.", "response": "Old pond / frog / splash"}],
    "camel": [
        {
            "role_1": "Physicist_RoleType.ASSISTANT",
            "topic;": "Optics",
            "message_1": "Why is the sky blue?",
            "message_2": "Rayleigh scattering.",
        }
    ],
    "unnatural": [
        {
            "instruction": "Answer with the sum.",
            "instances": [
                {
                    "instruction_with_input": "Answer with the sum. 1 2",
                    "input": "1 2",
                    "output": "3",
                    "constraints": "None.",
                }
            ],
            "reformulations": [
                {"instruction": "Add these numbers.", "input": "4 5", "output": "9"}
            ],
        }
    ],
    "sharegpt": [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "gpt", "value": "Hello! (a greeting before any question)"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye."},
                {"from": "human", "value": "(never answered)"},
            ],
        }
    ],
    "wizardlm-v2": [
        {
            "idx": "b",
            "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}],
        }
    ],
}

EXPECTED = {
    "alpaca": [("Add 2 and 3.", "", "5")],
    "gpt4-llm": [("Name a colour.", "", "Blue.")],
    "codealpaca": [("Reverse a list.", "[1, 2]", "[2, 1]")],
    "wizardlm": [("Explain gravity briefly.", "", "Mass attracts mass.")],
    "gpteacher": [("Greet me.", "as a pirate", "Ahoy!")],
    "airoboros": [("Write a haiku.", "", "Old pond / frog / splash")],
    "camel": [("Why is the sky blue?", "", "Rayleigh scattering.")],
    # the instance's own instruction_with_input (its "None." constraints add nothing); the
    # reformulation without one keeps its input in the Input block
    "unnatural": [("Answer with the sum. 1 2", "", "3"), ("Add these numbers.", "4 5", "9")],
}


@pytest.mark.parametrize("fmt", sorted(SYNTHETIC))
@pytest.mark.parametrize("jsonl", [False, True])
def test_each_format(tmp_path: Path, fmt: str, jsonl: bool) -> None:
    path = write_json(tmp_path / f"src.{'jsonl' if jsonl else 'json'}", SYNTHETIC[fmt], jsonl=jsonl)
    for given in (fmt, "auto"):
        records, stats = load(path, given)
        assert not stats.problems and not stats.errors
        if fmt in EXPECTED:
            assert [(r.instruction, r.input, r.output) for r in records] == EXPECTED[fmt]
            assert not any(r.is_chat for r in records)
    if fmt == "sharegpt":
        (rec,) = records
        assert rec.system == "Be brief."
        assert [(m.role, m.content) for m in rec.conversation or []] == [
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
            ("assistant", "Goodbye."),
        ]
    if fmt == "wizardlm-v2":
        assert [m.content for m in records[0].conversation or []] == ["Q1", "A1"]


def test_hf_source_goes_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:` sources are read with datasets.load_dataset (faked here: no network in tests)."""
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(name: str, config: str | None = None, split: str = "train") -> list[dict]:
        seen.update(name=name, config=config, split=split)
        return SYNTHETIC["alpaca"] * 2

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    stats = SourceStats("hf")
    src = SourceConfig(name="hf", hf="someone/alpaca", split="train[:10]")
    records = list(load_source(src, stats))
    assert seen == {"name": "someone/alpaca", "config": None, "split": "train[:10]"}
    assert len(records) == 2 and records[1].position == "row 1"


# --- problems are reported with source and position, and never stop the run -----------------


def test_malformed_records_and_files_are_reported(tmp_path: Path) -> None:
    good = write_json(tmp_path / "good.json", SYNTHETIC["alpaca"])
    lines = [
        json.dumps(SYNTHETIC["gpteacher"][0]),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"instruction": "no response field"}),
        json.dumps({"instruction": 5, "response": "x"}),
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    sources = [
        {"name": "good", "path": str(good)},
        {"name": "mixed", "path": str(tmp_path / "mixed.jsonl"), "format": "gpteacher"},
        {"name": "broken", "path": str(tmp_path / "broken.json")},
        {"name": "missing", "path": str(tmp_path / "nope.json")},
    ]
    cfg = DataConfig(sources=[SourceConfig(**s) for s in sources])
    records, report = build_mix(cfg, words)
    assert len(records) == 2  # good's record and mixed's one valid line
    mixed = report.sources["mixed"]
    assert mixed.records_in == 5 and mixed.dropped["malformed"] == 4 and mixed.records_out == 1
    assert [p.split(":")[0] for p in mixed.problems] == [
        "mixed.jsonl line 2",
        "mixed.jsonl line 3",
        "mixed.jsonl line 4",
        "mixed.jsonl line 5",
    ]
    assert "missing field 'response'" in mixed.problems[2]
    assert "not text" in mixed.problems[3]
    assert report.sources["broken"].errors and "invalid JSON" in report.sources["broken"].errors[0]
    assert report.sources["missing"].errors and "cannot read" in report.sources["missing"].errors[0]
    md = report.markdown()
    assert "mixed mixed.jsonl line 2" in md and "broken" in md


# --- cleaning counts ---------------------------------------------------------------------------


def test_dedup_and_filter_counts(tmp_path: Path) -> None:
    a = [
        {"instruction": "Say hi", "input": "", "output": "Hi there."},
        {"instruction": "say  HI", "input": "", "output": "hi   there."},  # same after normalising
        {"instruction": "Say hi", "input": "", "output": "Hi there!"},  # different output: kept
        {"instruction": "Empty", "input": "", "output": "   "},
        {"instruction": "Refuse", "input": "", "output": "As an AI language model, I cannot."},
        {"instruction": "Sorry", "input": "", "output": "I'm sorry, but I cannot help."},
        {"instruction": "Fine", "input": "", "output": "Sure: 42."},
    ]
    b = [
        {"instruction": "Say hi", "response": "Hi there."},  # duplicate of a source-a record
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "as an AI language model..."},
            ]
        },
    ]
    pa = write_json(tmp_path / "a.json", a)
    pb = write_json(tmp_path / "b.jsonl", b[:1], jsonl=True)
    pc = write_json(tmp_path / "c.json", b[1:])
    srcs = [
        SourceConfig(name="a", path=str(pa)),
        SourceConfig(name="b", path=str(pb)),
        SourceConfig(name="c", path=str(pc)),
    ]
    _, report = build_mix(DataConfig(sources=srcs), words)
    sa, sb, sc = (report.sources[n] for n in "abc")
    assert sa.records_in == 7 and sa.records_out == 3
    assert dict(sa.dropped) == {"duplicate": 1, "empty_output": 1, "refusal": 2}
    assert dict(sb.dropped) == {"duplicate": 1} and sb.records_out == 0
    assert dict(sc.dropped) == {"refusal": 1}
    for s in (sa, sb, sc):  # every record in is either out or dropped for one reason
        assert s.records_in == s.records_out + sum(s.dropped.values()) - s.mix_delta

    cfg = DataConfig(sources=srcs, refusal_filter=False, dedup=False)
    _, report = build_mix(cfg, words)
    assert report.sources["a"].records_out == 6  # only the empty output goes
    cfg = DataConfig(sources=srcs, refusal_phrases=["sure:"])
    _, report = build_mix(cfg, words)
    assert dict(report.sources["a"].dropped) == {"duplicate": 1, "empty_output": 1, "refusal": 1}


def test_overlength_drop_or_truncate_at_turn_boundaries(tmp_path: Path) -> None:
    long = " ".join(["word"] * 40)
    conv = {
        "conversations": [
            {"from": "human", "value": "short question"},
            {"from": "gpt", "value": "short answer"},
            {"from": "human", "value": "and now"},
            {"from": "gpt", "value": long},
        ]
    }
    single = {"instruction": "long one", "input": "", "output": long}  # no turn to cut: dropped
    path = write_json(tmp_path / "c.json", [conv, single])
    src = [SourceConfig(name="c", path=str(path))]
    records, report = build_mix(
        DataConfig(sources=src, max_length=20, overlength="truncate"), words
    )
    stats = report.sources["c"]
    assert stats.truncated == 1 and dict(stats.dropped) == {"overlength": 1}
    (rec,) = records
    assert [m.content for m in rec.conversation or []] == ["short question", "short answer"]
    records, report = build_mix(DataConfig(sources=src, max_length=20, overlength="drop"), words)
    assert not records and report.sources["c"].dropped["overlength"] == 2


def test_mix_weights_and_limits(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    path = write_json(tmp_path / "x.json", rows)
    srcs = [
        SourceConfig(name="half", path=str(path), weight=0.5),
        SourceConfig(name="double", path=str(path), weight=2.0),
        SourceConfig(name="capped", path=str(path), weight=3.0, limit=12),
    ]
    cfg = DataConfig(sources=srcs, dedup=False)
    records, report = build_mix(cfg, words)
    out = {n: s.records_out for n, s in report.sources.items()}
    assert out == {"half": 5, "double": 20, "capped": 12}
    assert report.sources["half"].mix_delta == -5 and report.sources["double"].mix_delta == 10
    assert len(records) == 37 == report.records_out
    assert sum(report.histogram.values()) == 37
    again, _ = build_mix(cfg, words)  # seeded: the same mix every time
    assert [r.to_json() for r in again] == [r.to_json() for r in records]


def test_prepared_files_round_trip(tmp_path: Path) -> None:
    path = write_json(tmp_path / "s.json", SYNTHETIC["sharegpt"] + SYNTHETIC["gpteacher"])
    cfg = DataConfig(sources=[SourceConfig(name="s", path=str(path))])
    records, report = build_mix(cfg, words)
    # with format: auto each record's own keys decide, so one file may mix formats
    assert len(records) == 2 and report.sources["s"].format == "sharegpt+gpteacher"
    cfg = DataConfig(sources=[SourceConfig(name="s", path=str(path), format="sharegpt")])
    records, report = build_mix(cfg, words)  # a named format is enforced on every record
    assert len(records) == 1 and report.sources["s"].dropped["malformed"] == 1
    path2 = write_json(tmp_path / "t.json", SYNTHETIC["gpteacher"])
    cfg = DataConfig(
        sources=[SourceConfig(name="s", path=str(path)), SourceConfig(name="t", path=str(path2))]
    )
    records, report = build_mix(cfg, words)
    write_prepared(tmp_path / "out", records, report)
    assert [r.to_json() for r in read_prepared(tmp_path / "out")] == [r.to_json() for r in records]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["sources"]["t"]["dropped"] == {"duplicate": 1}  # already in s, across sources
    assert "| tokens | records |" in (tmp_path / "out" / "report.md").read_text()


def test_all_real_samples_prepare_without_failures(tmp_path: Path) -> None:
    """Every file in ../shared/data through the whole loader, and written out."""
    need_data()
    srcs = [SourceConfig(name=n, path=str(DATA / f)) for n, (f, _) in sorted(REAL_FILES.items())]
    records, report = build_mix(DataConfig(sources=srcs), words)
    assert report.failures() == [] and len(records) > 8000
    write_prepared(tmp_path / "out", records, report)
    assert len(read_prepared(tmp_path / "out")) == len(records)


# --- Unnatural Instructions, in its real shape ------------------------------------------------

#: One task of Unnatural Instructions' full set as published (core fields plus reformulations):
#: the task `instruction` is the bare task; each instance has the task with its input written in
#: (`instruction_with_input`) and `constraints`; reformulations' `instruction` holds `{INPUT}`.
UNNATURAL_TASK = (
    'You are given a science question (easy-level) and four answer options (associated with "A", '
    '"B", "C", "D"). Your task is to find the correct answer based on scientific facts, knowledge, '
    "and reasoning. Do not generate anything else apart from one of the following characters: "
    "'A', 'B', 'C', 'D'. There is only one correct answer for each question."
)
UNNATURAL_Q = (
    "Which form of energy is produced when a rubber band vibrates? "
    "(A) chemical energy (B) light energy (C) electrical energy (D) sound energy"
)
UNNATURAL_REAL = {
    "instruction": UNNATURAL_TASK,
    "instances": [
        {
            "instruction_with_input": f"{UNNATURAL_TASK}\nQuestion: {UNNATURAL_Q}",
            "input": f"Question: {UNNATURAL_Q}",
            "constraints": "The output should be one of the following characters: 'A', 'B, 'C', 'D'.",
            "output": "D",
        }
    ],
    "reformulations": [
        {
            "instruction": "Answer the science question below by choosing A, B, C or D. {INPUT}",
            "instruction_with_input": "Answer the science question below by choosing A, B, C or "
            f"D. Question: {UNNATURAL_Q}",
            "input": f"Question: {UNNATURAL_Q}",
            "output": "D",
        },
        {
            "instruction": "Pick the right letter for this question: {INPUT}",
            "input": f"Question: {UNNATURAL_Q}",
            "output": "D",
        },
    ],
}


def test_unnatural_uses_each_instances_instruction_with_input(tmp_path: Path) -> None:
    path = write_json(tmp_path / "unnatural.jsonl", [UNNATURAL_REAL], jsonl=True)
    for fmt in ("unnatural", "auto"):
        records, stats = load(path, fmt)
        assert not stats.problems and stats.records_in == 3
        got = [(r.instruction, r.input, r.output) for r in records]
        instance = UNNATURAL_REAL["instances"][0]
        assert got[0] == (
            f"{instance['instruction_with_input']}\n\n{instance['constraints']}",
            "",
            "D",
        )
        assert got[1] == (UNNATURAL_REAL["reformulations"][0]["instruction_with_input"], "", "D")
        # without instruction_with_input the placeholder is filled with the instance's input
        assert got[2] == (
            f"Pick the right letter for this question: Question: {UNNATURAL_Q}",
            "",
            "D",
        )
        assert not any("{INPUT}" in r.instruction for r in records)
        assert all(UNNATURAL_Q in r.instruction for r in records)  # the question is never lost


# --- ShareGPT with tool turns -----------------------------------------------------------------

TOOL_CHAT = {
    "tools": '[{"name": "get_weather", "parameters": {"city": "string"}}]',
    "conversations": [
        {"from": "human", "value": "What's the weather in Paris?"},
        {
            "from": "function_call",
            "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        },
        {"from": "observation", "value": '{"temp_c": 18}'},
        {"from": "gpt", "value": "It is 18 °C in Paris."},
        {"from": "human", "value": "And tomorrow?"},
        {"from": "gpt", "value": "Let me check."},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"day": 2}}'},
        {"from": "observation", "value": '{"temp_c": 21}'},
        {"from": "narrator", "value": "(an aside no format knows)"},
        {"from": "gpt", "value": "21 °C tomorrow."},
    ],
}


def test_sharegpt_tool_turns_become_input_blocks(tmp_path: Path) -> None:
    plain = SYNTHETIC["sharegpt"][0]
    path = write_json(tmp_path / "tools.json", [TOOL_CHAT, plain])
    cfg = DataConfig(sources=[SourceConfig(name="t", path=str(path), format="sharegpt")])
    records, report = build_mix(cfg, words)
    stats = report.sources["t"]
    assert len(records) == 2 and stats.records_out == 2 and not stats.problems  # none dropped
    assert dict(stats.skipped_turns) == {"narrator": 1}  # the unknown turn alone, counted
    assert "1 turn(s) with unknown speaker 'narrator' left out" in report.markdown()
    (rec,) = [r for r in records if "Paris" in r.texts()[2]]
    assert [(m.role, m.name) for m in rec.conversation or []] == [
        ("input", "tools"),
        ("user", ""),
        ("input", "function_call"),
        ("input", "observation"),
        ("assistant", ""),
        ("user", ""),
        ("assistant", ""),
        ("input", "function_call"),
        ("input", "observation"),
        ("assistant", ""),
    ]
    assert rec.targets() == ["It is 18 °C in Paris.", "Let me check.", "21 °C tomorrow."]
    again = Record.from_json(json.loads(json.dumps(rec.to_json())))
    assert again.to_json() == rec.to_json()

    # replies may be separated by tool turns; two user turns (tools between or not) may not
    def turn(who: str, text: str) -> dict[str, str]:
        return {"from": who, "value": text}

    bad = [
        [turn("human", "a"), turn("human", "b"), turn("gpt", "c")],
        [turn("human", "a"), turn("observation", "x"), turn("human", "b"), turn("gpt", "c")],
        [turn("human", "a"), turn("gpt", "b"), turn("gpt", "c")],
    ]
    path = write_json(tmp_path / "bad.json", [{"conversations": c} for c in bad])
    records, stats = load(path, "sharegpt")
    assert (
        not records
        and [p.split(": ")[1] for p in stats.problems] == ["speakers do not alternate"] * 3
    )


# --- a source that is missing, unreadable or empty --------------------------------------------


def test_missing_or_empty_source_fails_unless_optional(tmp_path: Path) -> None:
    good = write_json(tmp_path / "good.json", SYNTHETIC["alpaca"])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nothing.json").write_text("[]")
    typo = tmp_path / "gpteacher-roleplya.json"
    cases = {
        "typo": (typo, "cannot read"),
        "empty": (tmp_path / "empty.jsonl", "no records: the source is empty"),
        "nothing": (tmp_path / "nothing.json", "no records: the source is empty"),
    }
    for name, (path, reason) in cases.items():
        srcs = [SourceConfig(name="good", path=str(good)), SourceConfig(name=name, path=str(path))]
        records, report = build_mix(DataConfig(sources=srcs), words)
        assert len(records) == 1  # the good source is still there...
        (failure,) = report.failures()  # ...but the lost one is an error that names itself
        assert failure.startswith(f"source {name!r} {path}") and reason in failure
        assert f"- {name} {path}: {reason}" in report.markdown()
        out = tmp_path / f"out-{name}"
        with pytest.raises(PrepareError, match=str(path)):
            write_prepared(out, records, report)
        assert not out.exists()

        srcs[1].optional = True
        records, report = build_mix(DataConfig(sources=srcs), words)
        assert report.failures() == [] and len(records) == 1
        (line,) = [x for x in report.markdown().splitlines() if x.startswith(f"- {name} ")]
        assert line.startswith(f"- {name} {path}: {reason}")
        assert line.endswith("(optional: skipped)")
        write_prepared(out, records, report)
        assert len(read_prepared(out)) == 1


def test_failed_prepare_rerun_keeps_the_previous_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real command: a good run, then reruns that fail leave its files as they were."""
    import yaml

    from tests.training_helpers import tiny_config_dict
    from training.__main__ import main

    good = write_json(tmp_path / "good.json", SYNTHETIC["alpaca"] + SYNTHETIC["gpteacher"])
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:-20])
    config = tmp_path / "run.yaml"

    def prepare(*sources: dict[str, object]) -> int:
        config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, list(sources))))
        return main(["prepare", "--config", str(config)])

    out = tmp_path / "data"
    assert prepare({"name": "good", "path": str(good)}) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before[RECORDS_FILE].splitlines()) == 2
    capsys.readouterr()

    assert prepare({"name": "broken", "path": str(truncated)}) == 1
    assert "source 'broken'" in capsys.readouterr().err
    missing = tmp_path / "god.json"
    assert prepare({"name": "good", "path": str(good)}, {"name": "typo", "path": str(missing)}) == 1
    assert str(missing) in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # intact, nothing added
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp

    # asked for: the typo'd source is optional, and the run succeeds without it
    typo = {"name": "typo", "path": str(missing), "optional": True}
    assert prepare({"name": "good", "path": str(good)}, typo) == 0


# --- names on chats, and single-turn records in the model card's layout ------------------------


def test_source_names_for_chats_only(tmp_path: Path) -> None:
    from training.tokenize import pieces_for

    chats = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(30)
    ]
    path = write_json(tmp_path / "c.json", chats + SYNTHETIC["alpaca"])
    fixed = SourceConfig(name="c", path=str(path), names=["alice"])
    records, _ = build_mix(DataConfig(sources=[fixed]), words)
    single = [r for r in records if not r.is_chat]
    assert [pieces_for(r) for r in single] == [
        [("### Instruction:\nAdd 2 and 3.\n\n### Response:\n", False), ("5", True)]
    ]
    chat = [r for r in records if r.is_chat]
    assert all(m.name == "alice" for r in chat for m in r.conversation or [] if m.role == "user")
    assert pieces_for(chat[0])[0][0].startswith("### Instruction:\nalice: q")

    drawn = SourceConfig(name="c", path=str(path), names=["ann", "bo", "cy"])
    records, _ = build_mix(DataConfig(sources=[drawn]), words)
    names = {r.position: r.conversation[0].name for r in records if r.conversation}
    assert set(names.values()) == {"ann", "bo", "cy"}  # drawn per conversation...
    again, _ = build_mix(DataConfig(sources=[drawn]), words)
    assert {r.position: r.conversation[0].name for r in again if r.conversation} == names  # seeded
