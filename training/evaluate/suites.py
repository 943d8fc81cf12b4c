"""The model card's benchmark suites: which lm-evaluation-harness tasks, shots and metrics.

Nous-Hermes-Llama2-7b's card reports three tables, all zero-shot, from lm-evaluation-harness:

- GPT4All: arc_challenge, arc_easy, boolq, hellaswag, openbookqa, piqa, winogrande (acc and
  acc_norm; the card's average takes acc_norm where a task has it, else acc).
- BigBench: 18 multiple-choice tasks, metric `multiple_choice_grade`. Current harness releases
  no longer ship these task names, so they are defined here (`tasks/`, YAML in the harness's own
  format) on BIG-bench's published data, with the card's names.
- AGIEval: the 8 English tasks (the harness's `agieval_nous` group), acc and acc_norm.

Kept apart from the runner so the card's settings are in one place and easy to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Task YAMLs shipped with the package (the card's BigBench tasks).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: Metric preference for a task's headline number (what the card's Average row averages).
HEADLINE_ORDER = ("acc_norm", "multiple_choice_grade", "acc")


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    title: str
    tasks: tuple[str, ...]
    num_fewshot: int = 0
    card_average: float | None = None  # Nous-Hermes-Llama2-7b's published average


GPT4ALL = Suite(
    "gpt4all",
    "GPT4All",
    (
        "arc_challenge",
        "arc_easy",
        "boolq",
        "hellaswag",
        "openbookqa",
        "piqa",
        "winogrande",
    ),
    card_average=0.686,
)

BIGBENCH = Suite(
    "bigbench",
    "BigBench",
    tuple(
        f"bigbench_{t}"
        for t in (
            "causal_judgement",
            "date_understanding",
            "disambiguation_qa",
            "geometric_shapes",
            "logical_deduction_five_objects",
            "logical_deduction_seven_objects",
            "logical_deduction_three_objects",
            "movie_recommendation",
            "navigate",
            "reasoning_about_colored_objects",
            "ruin_names",
            "salient_translation_error_detection",
            "snarks",
            "sports_understanding",
            "temporal_sequences",
            "tracking_shuffled_objects_five_objects",
            "tracking_shuffled_objects_seven_objects",
            "tracking_shuffled_objects_three_objects",
        )
    ),
    card_average=0.3525,
)

AGIEVAL = Suite(
    "agieval",
    "AGIEval",
    (
        "agieval_aqua_rat",
        "agieval_logiqa_en",
        "agieval_lsat_ar",
        "agieval_lsat_lr",
        "agieval_lsat_rc",
        "agieval_sat_en",
        "agieval_sat_en_without_passage",
        "agieval_sat_math",
    ),
    card_average=0.2975,
)

BENCHMARKS: dict[str, Suite] = {s.name: s for s in (GPT4ALL, BIGBENCH, AGIEVAL)}
#: What `--suite` accepts; `all` is every benchmark suite and the chat suite.
SUITE_CHOICES = (*BENCHMARKS, "chat", "all")


def custom_suite(tasks: list[str], num_fewshot: int | None = None) -> Suite:
    """A suite of any harness tasks (`--tasks`), e.g. a local YAML task under `--include-path`."""
    return Suite("tasks", "Tasks", tuple(tasks), num_fewshot if num_fewshot is not None else 0)


def headline_metric(metrics: list[str]) -> str | None:
    """The metric a task contributes to the Average row: acc_norm, else the card's
    multiple_choice_grade, else acc, else the first one reported."""
    for name in HEADLINE_ORDER:
        if name in metrics:
            return name
    return metrics[0] if metrics else None
