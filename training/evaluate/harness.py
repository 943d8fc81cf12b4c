"""Benchmark suites through EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`).

Each model folder is loaded once with the harness's Hugging Face backend (`HFLM`, batch size
`auto` by default) and every requested suite runs on it. With the bot's ENGINE=openai (`Remote`)
the model is the one an OpenAI-compatible server serves instead, through the harness's
`local-completions` backend: log-likelihoods come from the server's `echo` + `logprobs`
(vLLM and llama.cpp's server give them), tokenized with the bot's TOKENIZER. Tasks are built one by one before any
model loads: a task whose dataset cannot be fetched (no hub, a typo in a name) gets one line
saying so and the rest go on. Scores come back as plain `TaskScore`s for `tables`.

lm-eval is an optional extra (`pip install 'hermes-discord[eval]'`); importing this module does
not need it, running does.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.evaluate.suites import TASKS_DIR, Suite

log = logging.getLogger(__name__)

Notice = Callable[[str], None]


class HarnessMissing(RuntimeError):
    """lm-eval is not installed."""


@dataclass(slots=True)
class TaskScore:
    """One task's numbers for one model: metric -> (value, stderr or None)."""

    task: str
    version: str
    num_fewshot: int | None
    samples: int | None
    metrics: dict[str, tuple[float, float | None]] = field(default_factory=dict)


@dataclass(slots=True)
class SuiteResult:
    """One suite for one model."""

    suite: str
    model: str
    scores: dict[str, TaskScore] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why it did not run
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Remote:
    """An OpenAI-compatible server, as the bot's settings name it (ENGINE=openai)."""

    base_url: str  # OPENAI_BASE_URL, ending in /v1
    api_key: str = ""
    tokenizer: str = ""  # TOKENIZER: the served model's tokenizer (default: the model name)

    @classmethod
    def from_settings(cls, settings: Any) -> Remote | None:
        if settings.engine != "openai":
            return None
        return cls(settings.openai_base_url, settings.openai_api_key, settings.tokenizer)


@dataclass(frozen=True, slots=True)
class HarnessOptions:
    batch_size: str = "auto"  # "auto" or a number
    max_batch_size: int = 64
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str = "auto"  # as DTYPE: bf16/fp16 on CUDA; bf16 on CPUs with native bf16, else fp32
    limit: float | None = None  # examples per task, for quick looks only
    include_paths: tuple[str, ...] = ()
    bootstrap_iters: int = 100000
    remote: Remote | None = None  # ENGINE=openai: the server, instead of loading the model


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessMissing(
            "lm-evaluation-harness is not installed: pip install 'hermes-discord[eval]'"
        ) from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def make_task_manager(names: Iterable[str], include_paths: Iterable[str]) -> Any:
    """A TaskManager that knows `names`: the package's tasks and `include_paths` first, and the
    harness's built-in catalogue only when a name needs it (indexing it takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(Path(p).resolve()) for p in include_paths)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=paths, include_defaults=True)


def load_tasks(manager: Any, names: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Build each task (this fetches its dataset): ({name: Task}, {name: why it failed})."""
    tasks: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as exc:  # offline hub, unknown name, broken YAML: one line, go on
            log.debug("task %s failed to load", name, exc_info=exc)
            failed[name] = f"{type(exc).__name__}: {first_line(exc)}"
            continue
        tasks.update(loaded["tasks"])
    return tasks, failed


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolved_dtype(dtype: str) -> str:
    """The dtype the bot would load the weights in (bot.engine.plan_load decides)."""
    from bot.engine import plan_load

    return plan_load(dtype, "none").dtype


def make_lm(model: str, opts: HarnessOptions) -> Any:
    """The harness's Hugging Face backend on a local folder (or hub id); with `opts.remote`,
    its `local-completions` backend on the model the server serves under that name."""
    if opts.remote is not None:
        return remote_lm(model, opts.remote, opts)
    from lm_eval.models.huggingface import HFLM

    batch: int | str = opts.batch_size if opts.batch_size == "auto" else int(opts.batch_size)
    return HFLM(
        pretrained=model,
        device=opts.device or default_device(),
        dtype=resolved_dtype(opts.dtype),
        batch_size=batch,
        max_batch_size=opts.max_batch_size,
    )


def remote_lm(model: str, server: Remote, opts: HarnessOptions) -> Any:
    """lm-eval's OpenAI-compatible completions backend, with the bot's server and key."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class Completions(LocalCompletionsAPI):  # type: ignore[misc]
        @property
        def api_key(self) -> str:  # the harness reads OPENAI_API_KEY; the bot's setting wins
            return server.api_key

    batch = 1 if opts.batch_size == "auto" else int(opts.batch_size)
    try:
        return Completions(
            base_url=f"{server.base_url.rstrip('/')}/completions",
            model=model,
            tokenizer=server.tokenizer or model,
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            batch_size=batch,
            max_retries=3,
        )
    except ModuleNotFoundError as exc:  # lm-eval without its `api` extra
        raise HarnessMissing(
            f"{first_line(exc)}: pip install 'hermes-discord[eval]' (it brings lm-eval[api])"
        ) from None


def backend_settings(opts: HarnessOptions) -> dict[str, Any]:
    """What `results.json` says about the backend and where it ran."""
    if opts.remote is not None:
        return {"backend": "openai-completions", "base_url": opts.remote.base_url}
    return {"backend": "hf", "device": opts.device or default_device()}


def parse_results(raw: dict[str, Any], task: str) -> TaskScore:
    """The harness's results for one task -> TaskScore (metric keys look like `acc,none`)."""
    values = raw["results"].get(task, {})
    metrics: dict[str, tuple[float, float | None]] = {}
    for key, value in values.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        if not isinstance(value, int | float):
            continue
        err = values.get(f"{metric}_stderr,{filt}")
        metrics[metric] = (float(value), float(err) if isinstance(err, int | float) else None)
    samples = raw.get("n-samples", {}).get(task, {})
    return TaskScore(
        task=task,
        version=str(raw.get("versions", {}).get(task, "")),
        num_fewshot=raw.get("n-shot", {}).get(task),
        samples=samples.get("effective") if isinstance(samples, dict) else None,
        metrics=metrics,
    )


def run_suites(
    models: list[str],
    suites: list[Suite],
    opts: HarnessOptions,
    *,
    notice: Notice = print,
) -> dict[str, dict[str, SuiteResult]]:
    """Every suite on every model: {suite: {model: SuiteResult}}, in the order given."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    names = [t for s in suites for t in s.tasks]
    manager = make_task_manager(names, opts.include_paths)

    # Which tasks can run at all: checked once, before any model is loaded.
    unavailable: dict[str, str] = {}
    for suite in suites:
        _, failed = load_tasks(manager, suite.tasks)
        for task, why in failed.items():
            notice(f"{suite.name}: {task} skipped, its data cannot be loaded ({why})")
        unavailable.update(failed)

    out: dict[str, dict[str, SuiteResult]] = {s.name: {} for s in suites}
    for model in models:
        runnable = [s for s in suites if any(t not in unavailable for t in s.tasks)]
        lm = make_lm(model, opts) if runnable else None
        for suite in suites:
            result = SuiteResult(suite.name, model)
            result.unavailable = {t: unavailable[t] for t in suite.tasks if t in unavailable}
            result.settings = {
                "harness": "lm-evaluation-harness " + _lm_eval_version(),
                **backend_settings(opts),
                "num_fewshot": suite.num_fewshot,
                "batch_size": opts.batch_size,
                "max_batch_size": opts.max_batch_size,
                "dtype": resolved_dtype(opts.dtype) if opts.remote is None else None,
                "limit": opts.limit,
                "tasks": list(suite.tasks),
            }
            out[suite.name][model] = result
            todo = [t for t in suite.tasks if t not in unavailable]
            if not todo or lm is None:
                continue
            notice(f"{suite.name}: {len(todo)} task(s) on {model}")
            tasks, failed = load_tasks(manager, todo)
            for task, why in failed.items():
                result.unavailable[task] = why
                notice(f"{suite.name}: {task} skipped, its data cannot be loaded ({why})")
            if not tasks:
                continue
            raw = simple_evaluate(
                model=lm,
                tasks=list(tasks.values()),
                num_fewshot=suite.num_fewshot,
                batch_size=opts.batch_size,
                max_batch_size=opts.max_batch_size,
                limit=opts.limit,
                log_samples=False,
                bootstrap_iters=opts.bootstrap_iters,
                task_manager=manager,
            )
            if raw is None:  # not rank 0
                continue
            result.settings["batch_sizes"] = raw.get("config", {}).get("batch_sizes", [])
            for task in suite.tasks:
                if task in tasks:
                    result.scores[task] = parse_results(raw, task)
        del lm
        _free_memory()
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
