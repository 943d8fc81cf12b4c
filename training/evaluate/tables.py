"""Markdown tables in the model card's layout, and the JSON file with every number.

Benchmark tables follow lm-evaluation-harness's layout as the card prints it
(`Task | Version | Metric | Value | ± | Stderr`), one Value/Stderr pair per model, a delta
column (last model minus first) when there are several, and an Average row: the mean over tasks
of each task's headline metric (acc_norm where a task has it, else multiple_choice_grade or acc),
which is how the card's averages are computed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.evaluate.harness import SuiteResult
from training.evaluate.suites import Suite, headline_metric


def model_labels(models: Sequence[str]) -> dict[str, str]:
    """Short column names: the folder (or hub repo) name, with as many parent folders as it
    takes to tell the models apart (`run/hf` vs `start/hf`)."""
    parts = {m: Path(m.rstrip("/")).parts or (m,) for m in models}
    for depth in range(1, max(len(p) for p in parts.values()) + 1):
        labels = {m: "/".join(p[-depth:]) for m, p in parts.items()}
        if len(set(labels.values())) == len(set(models)):
            return labels
    return {m: m for m in models}


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{b - a:+.4f}"


def suite_average(result: SuiteResult, tasks: Sequence[str]) -> tuple[float | None, int]:
    """(mean headline metric over the tasks that ran, how many ran)."""
    values = []
    for task in tasks:
        score = result.scores.get(task)
        if score is None:
            continue
        metric = headline_metric(list(score.metrics))
        if metric is not None:
            values.append(score.metrics[metric][0])
    return (sum(values) / len(values) if values else None), len(values)


def _row(cells: Sequence[str]) -> str:
    return "|" + "|".join(cells) + "|"


def benchmark_table(suite: Suite, results: dict[str, SuiteResult]) -> str:
    """One suite's table; `results` maps model -> SuiteResult, in column order."""
    models = list(results)
    labels = model_labels(models)
    several = len(models) > 1
    head = ["Task", "Version", "Metric"]
    align = [":---", "------:", ":-----"]
    for m in models:
        suffix = f" ({labels[m]})" if several else ""
        head += [f"Value{suffix}", " ", f"Stderr{suffix}"]
        align += ["-----:", ":-:", "-----:"]
    if several:
        head.append(f"Δ ({labels[models[-1]]} − {labels[models[0]]})")
        align.append("-----:")
    lines = [f"### {suite.title}", "", _row(head), _row(align)]
    for task in suite.tasks:
        scores = [results[m].scores.get(task) for m in models]
        present = [s for s in scores if s is not None]
        if not present:
            continue
        metrics: list[str] = []
        for s in present:
            metrics += [k for k in s.metrics if k not in metrics]
        version = present[0].version
        for i, metric in enumerate(metrics):
            cells = [task if i == 0 else "", version if i == 0 else "", metric]
            values: list[float | None] = []
            for s in scores:
                value, err = s.metrics.get(metric, (None, None)) if s else (None, None)
                values.append(value)
                cells += [_num(value), "±" if err is not None else "", _num(err)]
            if several:
                cells.append(_delta(values[0], values[-1]))
            lines.append(_row(cells))
    averages = [suite_average(results[m], suite.tasks) for m in models]
    cells = ["Average", "", "headline"]
    for avg, n in averages:
        note = "" if n == len(suite.tasks) else f" ({n}/{len(suite.tasks)} tasks)"
        cells += [_num(avg) + note, "", ""]
    if several:
        cells.append(_delta(averages[0][0], averages[-1][0]))
    lines.append(_row(cells))
    lines.append("")
    lines.append(
        "Headline metric per task: acc_norm where reported, else multiple_choice_grade or acc."
    )
    if suite.card_average is not None:
        lines.append(f"Nous-Hermes-Llama2-7b model card average: {suite.card_average:.4f}.")
    missing = {t: why for m in models for t, why in results[m].unavailable.items()}
    for task, why in missing.items():
        lines.append(f"Not run: {task} ({why}).")
    return "\n".join(lines) + "\n"


#: The chat suite's rows: (key in the results, label, format).
CHAT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss on reply tokens (nats/token)", ".4f"),
    ("perplexity", "perplexity on reply tokens", ".3f"),
    ("examples", "validation conversations (loss)", "d"),
    ("target_tokens", "reply tokens scored", "d"),
    ("replies", "replies generated", "d"),
    ("clean_end", "ends cleanly (EOS or a stop rule) within MAX_NEW_TOKENS", ".3f"),
    ("eos", "ends with EOS", ".3f"),
    ("stopped", "ended by a stop rule (block header or another speaker)", ".3f"),
    ("length", "cut at MAX_NEW_TOKENS", ".3f"),
    ("other_speaker_or_header", "tries to write another speaker's line or a header", ".3f"),
    ("empty", "empty after cleaning", ".3f"),
    ("mean_new_tokens", "mean reply length (tokens generated)", ".1f"),
    ("mean_reply_chars", "mean reply length (characters after cleaning)", ".1f"),
    ("tokens_per_s", "tokens/s (all replies, batched by the engine)", ".1f"),
)


def chat_table(results: dict[str, dict[str, Any]]) -> str:
    """The chat suite's table; `results` maps model -> that model's chat numbers."""
    models = list(results)
    labels = model_labels(models)
    several = len(models) > 1
    head = ["Metric", *(labels[m] for m in models)]
    if several:
        head.append(f"Δ ({labels[models[-1]]} − {labels[models[0]]})")
    lines = [
        "### Chat (served format)",
        "",
        _row(head),
        _row([":---"] + ["---:"] * (len(head) - 1)),
    ]
    for key, label, fmt in CHAT_ROWS:
        values = [results[m].get(key) for m in models]
        if all(v is None for v in values):
            continue
        cells = [label] + ["" if v is None else format(v, fmt) for v in values]
        if several:
            a, b = values[0], values[-1]
            cells.append("" if a is None or b is None else format(b - a, "+" + fmt))
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
