"""The YAML run config as dataclasses, so a typo in a key fails at load time, not after an hour.

One file describes a whole run: which sources go into the mix (`data`), which model to start from
(`model`), how to train it (`train`), optional LoRA/QLoRA (`lora`) and how to write the Hugging Face
folder at the end (`export`). `--set section.key=value` on the command line overrides any field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Phrases that mark a GPT-4 refusal or an "As an AI language model" disclaimer. Hermes was trained
#: on data filtered of these so it answers instead of apologising; a config may replace the list.
DEFAULT_REFUSAL_PHRASES = (
    "as an ai language model",
    "as a language model",
    "as an ai assistant",
    "i'm sorry, but as an ai",
    "i am sorry, but as an ai",
    "i'm sorry, but i cannot",
    "i'm sorry, i cannot",
    "i cannot fulfill",
    "i can't fulfill",
    "i am not able to provide",
    "i'm not able to provide",
    "it is not appropriate for me",
    "openai's content policy",
    "against my programming",
    "i do not have personal opinions",
    "i don't have personal opinions",
)


#: Validation split shared by the trainer (`train.val_fraction`, `train.val_examples`) and
#: `hermes-train eval --suite chat` (`--val-fraction`, `--max-examples`): with the defaults, the
#: eval scores exactly the records the trainer held out and scored.
DEFAULT_VAL_FRACTION = 0.02  # share of the prepared records held out (a stable hash of each)
DEFAULT_VAL_EXAMPLES = 500  # held-out conversations scored for the loss (the first, file order)


class ConfigError(ValueError):
    """The config file is wrong in a way the user must fix."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-5`, `3e-4` and
    `1.0e5` are read as strings, so `lr: 1e-5` and `--set train.lr=1e-5` were refused ("expected
    float"). Numbers are read as users (and YAML 1.2, JSON, Python) write them.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """YAML as configs and `--set` values are read (`_Loader`: `1e-5` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class SourceConfig:
    """One source of the mix: a local JSON/JSONL file or a `datasets` name, with its share."""

    name: str
    path: str | None = None  # local .json (a list) or .jsonl file
    hf: str | None = None  # a `datasets.load_dataset` name, for machines with internet
    hf_config: str | None = None
    split: str = "train"
    format: str = "auto"  # see training.source_formats.FORMATS
    weight: float = 1.0  # <1 samples that share, >1 repeats the source (upsampling)
    limit: int | None = None  # at most this many records after weighting
    system: str = ""  # system text for this source's multi-turn records
    optional: bool = False  # a missing/unreadable/empty source is skipped instead of an error
    names: list[str] = field(default_factory=list)  # speaker names for user turns: one fixed
    # name, or a list drawn from per conversation (seeded); pseudonyms for hermes-memory
    persona: str | None = None  # a built-in persona name or a card file: chats rendered as it
    personas: list[str] = field(default_factory=list)  # hermes-memory: extra card files
    channels: list[int] = field(default_factory=list)  # hermes-memory: channel ids to read
    pseudonymise: bool = True  # hermes-memory: replace members' names and mentions
    prompt_budget: int | None = None  # the bot's prompt budget (CONTEXT_TOKENS - MAX_NEW_TOKENS)
    # for persona prompts; default data.max_length


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    prepared_dir: str = "runs/data"  # where `prepare` writes records.jsonl and the report
    max_length: int = 4096  # tokens per example, and the packing length
    overlength: str = "truncate"  # "truncate" (at turn boundaries) or "drop"
    dedup: bool = True
    refusal_filter: bool = True
    refusal_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PHRASES))
    seed: int = 42


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local folder of the base model
    tokenizer: str | None = None  # defaults to name_or_path
    from_config: dict[str, Any] | None = None  # LlamaConfig kwargs: a fresh random model (tests)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed on CUDA, else sdpa
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile each decoder layer (opt-in: minutes of compiling first)


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    load_in_4bit: bool = False  # QLoRA: bitsandbytes NF4 base weights (CUDA only)


@dataclass
class TrainSettings:
    output_dir: str = "runs/hermes"
    # The batch is counted in samples (records), as the recipe is: stanford_alpaca trains 128
    # samples per optimizer step. Each GPU packs its share into micro-batches of at most
    # micro_batch_size x data.max_length tokens (gradient accumulation over those).
    micro_batch_size: int = 1  # packed rows of max_length per forward pass, per GPU
    global_batch_size: int = 128  # samples per optimizer step, over all GPUs
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-5
    min_lr_ratio: float = 0.0  # cosine floor, as a share of lr
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # A step whose loss or gradient norm is NaN/inf is skipped (no optimizer update; the schedule
    # and the data move on) and counted; this many in a row stop the run with an error.
    max_bad_steps: int = 3
    precision: str = "bf16"  # "bf16" (fp32 master weights, bf16 compute) or "fp32"
    seed: int = 42
    save_every: int = 200  # optimizer steps between checkpoints (0: only the last one)
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1
    peak_tflops: float | None = None  # per device, for MFU; guessed from the GPU name if unset
    export_dir: str | None = None  # write the Hugging Face folder here when training ends
    progress_bar: bool = True
    # Validation: every eval_every optimizer steps and at the last one, the chat suite's loss on
    # reply tokens (training.evaluate.chat_suite.chat_loss) over held-out records, logged as
    # val_loss. 0: off, and no record is held out. When on, the val_fraction split of the
    # prepared records (the split `hermes-train eval --suite chat` uses) is never trained on;
    # the first val_examples of it are scored.
    eval_every: int = 0
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_examples: int = DEFAULT_VAL_EXAMPLES
    # Checkpoint every step whose val_loss is the lowest so far and keep it (keep_last never
    # removes it); the run's export and `hermes-train export` write it instead of the last step.
    keep_best: bool = False


@dataclass
class ExportSettings:
    dtype: str = "bfloat16"  # dtype of the exported safetensors
    max_shard_size: str = "5GB"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    export: ExportSettings = field(default_factory=ExportSettings)

    def validate(self) -> Config:
        if self.model.name_or_path is None and self.model.from_config is None:
            raise ConfigError("model: set name_or_path (a base model) or from_config")
        if self.model.name_or_path is None and self.model.tokenizer is None:
            raise ConfigError("model.tokenizer is required with model.from_config")
        if self.data.overlength not in ("truncate", "drop"):
            raise ConfigError(
                f"data.overlength must be truncate or drop, not {self.data.overlength!r}"
            )
        if self.train.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision must be bf16 or fp32, not {self.train.precision!r}")
        if self.train.global_batch_size < 1 or self.train.micro_batch_size < 1:
            raise ConfigError("train.global_batch_size and micro_batch_size must be at least 1")
        if self.train.max_bad_steps < 1:
            raise ConfigError("train.max_bad_steps must be at least 1")
        if self.train.eval_every < 0 or self.train.val_examples < 1:
            raise ConfigError("train.eval_every must be >= 0 and train.val_examples >= 1")
        if self.train.eval_every and not 0 < self.train.val_fraction < 1:
            raise ConfigError(
                f"train.val_fraction must be between 0 and 1, not {self.train.val_fraction}"
            )
        if self.train.keep_best and not self.train.eval_every:
            raise ConfigError("train.keep_best needs train.eval_every > 0 (a validation loss)")
        if self.lora.load_in_4bit and not self.lora.enabled:
            raise ConfigError("lora.load_in_4bit needs lora.enabled: true (QLoRA)")
        names = [s.name for s in self.data.sources]
        if len(names) != len(set(names)):
            raise ConfigError(f"data.sources: names must be unique, got {names}")
        for s in self.data.sources:
            if (s.path is None) == (s.hf is None):
                raise ConfigError(f"data.sources[{s.name}]: set exactly one of path or hf")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer or str(self.model.name_or_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    """Turn a YAML mapping into dataclass `cls`, refusing unknown keys with their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - known):
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {value!r}")
    wrong_bool = tp is int and isinstance(value, bool)
    if tp in (int, str, bool) and (not isinstance(value, tp) or wrong_bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


Override = tuple[str, Any]  # ("train.max_steps", 10): a dotted key and its (YAML-typed) value

#: Written in `train.output_dir` by every command: the command-line overrides of the run (reused
#: by the next command, so `--tokenizer`/`--data`/`--set` are given once) and the resolved config.
OVERRIDES_FILE = "overrides.yaml"
RESOLVED_FILE = "config.yaml"


def parse_override(assignment: str) -> Override:
    """`a.b.c=value` (value parsed as YAML) -> ("a.b.c", value)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    return key.strip(), read_yaml(raw)


def set_override(data: dict[str, Any], assignment: str | Override) -> None:
    """Apply one `a.b.c=value` (or a parsed pair) to the raw config mapping."""
    key, value = parse_override(assignment) if isinstance(assignment, str) else assignment
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[last] = value


def resolve_path(name: str | Path) -> Path:
    """A config path as given, or the name of a bundled config (`tiny-cpu`, `hermes-7b-8xa100`)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.exists():
        return bundled
    raise ConfigError(
        f"no config file {name!s} (bundled: {sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))})"
    )


def load_config(
    path: str | Path, overrides: list[str] | list[Override] | tuple[str, ...] = ()
) -> Config:
    """Read, override and validate a run config."""
    raw = read_yaml(resolve_path(path).read_text()) or {}
    for assignment in overrides:
        set_override(raw, assignment)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "").validate()


def merge_overrides(first: list[Override], then: list[Override]) -> list[Override]:
    """`first` then `then`, one entry per key (the later value wins, in its later place)."""
    merged: dict[str, Any] = {}
    for key, value in [*first, *then]:
        merged.pop(key, None)
        merged[key] = value
    return list(merged.items())


@dataclass
class RunConfig:
    """The config one command runs with, and where it came from."""

    config: Config
    overrides: list[Override]  # all of them: saved by earlier commands of the run, then these
    reused: list[str]  # keys taken from the run folder, not from this command line


def load_run_config(path: str | Path, overrides: list[Override]) -> RunConfig:
    """The YAML config, the overrides an earlier command of the same run saved in its
    `train.output_dir`, then this command's overrides (which win)."""
    first = load_config(path, overrides)
    saved_file = Path(first.train.output_dir) / OVERRIDES_FILE
    if not saved_file.exists():
        return RunConfig(first, list(overrides), [])
    saved = read_yaml(saved_file.read_text()) or {}
    if saved.get("config") != str(resolve_path(path).resolve()):
        return RunConfig(first, list(overrides), [])  # another config's run: nothing to reuse
    earlier = [(k, v) for k, v in (saved.get("set") or {}).items()]
    merged = merge_overrides(earlier, overrides)
    given = {k for k, _ in overrides}
    return RunConfig(load_config(path, merged), merged, [k for k, _ in earlier if k not in given])


def save_resolved(cfg: Config) -> Path:
    """Write the resolved config (every field) to `train.output_dir/config.yaml`."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / RESOLVED_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out / RESOLVED_FILE


def save_run_config(path: str | Path, run: RunConfig) -> None:
    """Record this command's overrides and the resolved config in the run folder."""
    save_resolved(run.config)
    text = yaml.safe_dump(
        {"config": str(resolve_path(path).resolve()), "set": dict(run.overrides)},
        sort_keys=False,
    )
    _write_atomic(Path(run.config.train.output_dir) / OVERRIDES_FILE, text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
