"""Helpers the card's BigBench task YAMLs name with `!function` (lm-evaluation-harness loads this
file by path, next to the YAMLs).

The card splits logical_deduction and tracking_shuffled_objects into their three/five/seven
object subtasks; the published dataset keeps them in one config, and the subtask is the number
of answer choices (one per object), so the split is a filter on that count.
"""

from __future__ import annotations

from typing import Any


def multiple_choice_only(dataset: Any) -> Any:
    """Rows that are multiple-choice questions (some BIG-bench configs mix in free-form ones)."""
    return dataset.filter(lambda doc: len(doc["multiple_choice_targets"]) > 0)


def _with_choices(dataset: Any, n: int) -> Any:
    return dataset.filter(lambda doc: len(doc["multiple_choice_targets"]) == n)


def three_choices(dataset: Any) -> Any:
    return _with_choices(dataset, 3)


def five_choices(dataset: Any) -> Any:
    return _with_choices(dataset, 5)


def seven_choices(dataset: Any) -> Any:
    return _with_choices(dataset, 7)


def multiple_choice_grade(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """1.0 when the choice with the highest log-likelihood is the gold one (the card's metric)."""
    lls = [float(r[0]) for r in results]
    gold = doc["multiple_choice_targets"].index(doc["targets"][0])
    best = max(range(len(lls)), key=lls.__getitem__)
    return {"multiple_choice_grade": float(best == gold)}
