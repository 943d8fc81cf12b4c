"""Every CUDA path of the project on one GPU, with no network, each step with its own time limit.

    python bench/gpu_check.py --wheels /path/to/wheels            # on the GPU machine
    python bench/gpu_check.py --only build,p1p2 --limit p1p2=300   # some steps, longer limit
    python bench/gpu_check.py --device cpu --size tiny --only build,packed   # CPU self-check

Steps, in order (each prints ONE line: `[name] ok|FAIL|TIMEOUT|skipped  <seconds>  <result>`,
so a partial run is still useful; a step that overruns its limit is killed and the run goes on):

  wheels   install the wheels below from --wheels into a temporary folder (nothing fetched)
  build    a random Llama-2-7B-shaped model, bf16, built on the GPU, with the Llama 2 tokenizer
           from ../shared/fixtures/llama2-tokenizer; saved once under --work and reused
  p1p2     bench/engine.py P1 (with the HF generate peer) and P2 on CUDA at that size
  4bit     QUANTIZATION=4bit: load through the bot's engine, one reply; memory and tokens/s
  8bit     the same with QUANTIZATION=8bit
  quant    bench/engine.py Q: none / 8bit / 4bit on that model in one run (load, footprint,
           one stream and 8 channels tokens/s); the same table the README shows for the CPU
  qlora    QLoRA (lora.load_in_4bit) on that model through training.model.build_model: 3
           AdamW steps on the device, the loss of each and the peak memory
  bench    `hermes-bot bench --json` on the model; single-stream tokens/s against the
           memory-bandwidth roofline (weight bytes / measured device copy bandwidth)
  mfu      bench/training_data.py --size 1b --seq-len 4096: train-step tokens/s and MFU
  packed   packed-row loss equals the separate losses on the device (sdpa; flash-attention 2
           too when flash_attn is installed)
  fsdp2    2 steps of a tiny training config on the device with FSDP2, one process (NCCL on
           CUDA, gloo on the CPU), through torchrun

The GPU machine is expected to have torch, transformers and accelerate, but not these wheels
(bring them, e.g. `pip download -d wheels <names>` on a machine with network, same Python):

  discord.py aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
  aiosqlite python-dotenv bitsandbytes prometheus-client tqdm pyyaml safetensors sentencepiece
  protobuf pillow

They are installed with `pip install --no-index --find-links WHEELS --target <tmp>` and reach
each step through PYTHONPATH; the machine's own site-packages are not touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "fixtures" / "llama2-tokenizer"

#: Import name -> pip name of what the steps need beyond torch/transformers/accelerate (pip
#: resolves their dependencies from the same wheel folder).
NEEDED = {
    "discord": "discord.py",
    "aiosqlite": "aiosqlite",
    "dotenv": "python-dotenv",
    "sentencepiece": "sentencepiece",  # the fixture tokenizer is a SentencePiece model
    "google.protobuf": "protobuf",
    "prometheus_client": "prometheus-client",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "tqdm": "tqdm",
}
QUANT = {"bitsandbytes": "bitsandbytes"}

SIZES: dict[str, dict[str, int]] = {
    # Llama-2-7B's shape (6.7B parameters)
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    # for the CPU self-check
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}

#: Seconds per step (an H100 finishes the whole run in under 8 minutes).
LIMITS: dict[str, float] = {
    "wheels": 60,
    "build": 120,
    "p1p2": 150,
    "4bit": 60,
    "8bit": 60,
    "quant": 240,
    "qlora": 120,
    "bench": 90,
    "mfu": 75,
    "packed": 30,
    "fsdp2": 75,
}
STEPS = list(LIMITS)


class UsageError(Exception):
    """Bad arguments: one line, exit status 2."""


@dataclass
class Outcome:
    name: str
    status: str  # ok | FAIL | TIMEOUT | skipped
    seconds: float
    result: str

    def line(self) -> str:
        return f"[{self.name}] {self.status} {self.seconds:.1f}s  {self.result}"


# --------------------------------------------------------------------------------------------
# Running a step: a subprocess with a time limit, whose last `RESULT:` line is the result


def run_step(
    name: str, cmd: list[str], limit: float, env: dict[str, str], parse: Callable[[str], str]
) -> Outcome:
    """Run `cmd` in its own process group; kill the group when it overruns `limit` seconds."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Outcome(name, "TIMEOUT", time.perf_counter() - t0, f"over its {limit:g}s limit")
        out.seek(0)
        text = out.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return Outcome(
            name, "FAIL", seconds, lines[-1][:300] if lines else f"exit {proc.returncode}"
        )
    try:
        return Outcome(name, "ok", seconds, parse(text))
    except Exception as exc:  # the step ran but printed something unexpected
        return Outcome(name, "FAIL", seconds, f"unreadable output: {exc}")


def result_line(text: str) -> str:
    found = [ln[len("RESULT: ") :] for ln in text.splitlines() if ln.startswith("RESULT: ")]
    if not found:
        raise ValueError("no RESULT line")
    return found[-1]


def grep(*patterns: str) -> Callable[[str], str]:
    """A parser joining the lines that match `patterns` (bench scripts print their own)."""

    def parse(text: str) -> str:
        hits = [ln.strip() for ln in text.splitlines() if any(re.search(p, ln) for p in patterns)]
        if not hits:
            raise ValueError(f"none of {patterns} in the output")
        return " | ".join(hits)

    return parse


# --------------------------------------------------------------------------------------------
# In-process steps (run as `gpu_check.py --internal NAME`, so each is its own process)


def build_model(out: Path, size: str, device: str, tokenizer: Path) -> str:
    """A random Llama of `size` in bf16 (fp32 on the CPU), built on `device`, saved with the
    Llama 2 tokenizer; reused when `out` already holds one of that size."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    marker = out / "gpu_check.json"
    if marker.is_file() and json.loads(marker.read_text()).get("size") == size:
        return f"reused {out} ({size})"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-5,
        **SIZES[size],
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"size": size, "params": params, "dtype": str(dtype)}))
    return f"built {out}: {params / 1e9:.2f}B parameters, {dtype}, on {device}"


def quant_reply(model: Path, quantization: str) -> str:
    """Load through the bot's engine with QUANTIZATION, get one reply; memory and tokens/s."""
    import asyncio

    import torch

    from bot.engine import GenerationParams, make_engine
    from bot.settings import load_settings

    async def go() -> str:
        settings = load_settings(
            env={"MODEL": str(model), "QUANTIZATION": quantization, "DB_PATH": "/tmp/q.db"},
            env_file=None,
        )
        engine = make_engine(settings)
        t0 = time.perf_counter()
        await engine.start()
        load = time.perf_counter() - t0
        try:
            gen = engine.generate(
                "### Instruction:\nhello there\n\n### Response:\n",
                GenerationParams(max_new_tokens=64, seed=0),
            )
            await gen.text_all()
        finally:
            await engine.close()
        mem = torch.cuda.max_memory_allocated() / 2**30
        s = gen.stats
        return (
            f"{quantization}: loaded in {load:.1f}s, footprint {engine.info.footprint_mb:,.0f} "
            f"MB, peak {mem:.2f} GiB, "
            f"{s.new_tokens} tokens at {s.tokens_per_s:.1f} tokens/s ({s.finish_reason})"
        )

    return asyncio.run(go())


def qlora_steps(model: Path, device: str, tokenizer: Path) -> str:
    """QLoRA as the trainer builds it (NF4 base, LoRA on q/k/v/o) on `model`: 3 AdamW steps on
    one repeated random row; the loss must fall."""
    import torch

    sys.path.insert(0, str(ROOT))
    from training.config import config_from_dict
    from training.distributed import DistInfo
    from training.model import build_model

    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(model), "tokenizer": str(tokenizer),
                      "attn_implementation": "sdpa", "gradient_checkpointing": True},
            "lora": {"enabled": True, "load_in_4bit": True, "r": 16, "alpha": 16,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"prepared_dir": "/tmp/unused", "sources": [{"name": "x", "path": "x.json"}]},
            "train": {"output_dir": "/tmp/unused", "lr": 1e-3},
        }
    )  # fmt: skip
    dev = torch.device(device)
    model_ = build_model(cfg, DistInfo(0, 1, 0, dev))
    opt = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=1e-3)
    top = min(1000, model_.config.vocab_size)
    ids = torch.randint(3, top, (1, 256), generator=torch.Generator().manual_seed(0)).to(dev)
    losses = []
    for _ in range(3):
        loss = model_(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"QLoRA loss did not fall: {losses}")
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    return f"QLoRA 3 steps, loss {' -> '.join(f'{x:.3f}' for x in losses)}, peak {mem:.2f} GiB"


def copy_bandwidth(device: str, mib: int = 1024) -> float:
    """Device memory copy bandwidth in bytes/s (read + write of a `mib` MiB buffer)."""
    import torch

    a = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        b.copy_(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * a.numel() * n / (time.perf_counter() - t0)


def roofline(report: dict[str, Any], device: str) -> str:
    """`hermes-bot bench` JSON plus the bandwidth roofline of single-stream decoding."""
    bw = copy_bandwidth(device)
    weights = report["memory"]["weights_mb"] * 2**20
    ceiling = bw / weights
    single = report["single_stream_tps"]
    levels = ", ".join(f"{lv['channels']}:{lv['tokens_per_s']:.0f}" for lv in report["levels"])
    ft = report["first_token"]
    cached = "off" if ft["cached_ms"] is None else f"{ft['cached_ms']:.0f} ms"
    rec = report["recommendation"]
    return (
        f"single stream {single:.1f} tokens/s = {single / ceiling:.0%} of the roofline "
        f"{ceiling:.1f} ({weights / 2**30:.1f} GiB weights / {bw / 1e9:.0f} GB/s copy); "
        f"aggregate by channels {levels}; TTFT cold {ft['cold_ms']:.0f} ms, cached "
        f"{cached}; load {report['load_s']:.1f}s; recommends MAX_BATCH="
        f"{rec['max_batch']} KV_CACHE_MB={rec['kv_cache_mb']}"
    )


def packed_check(device: str) -> str:
    """Packed-row loss (and gradients) equal the token-weighted separate losses on `device`."""
    import importlib.util
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from training.packing import collate_rows, pack_lengths, packed_loss_sum
    from training.tokenize import IGNORE_INDEX, Example

    def loss_sum(logits: Any, labels: Any) -> Any:  # plain causal-LM loss of one document
        return torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )

    impls = ["sdpa"]
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    rng = random.Random(0)
    examples = []
    for _ in range(9):
        n = rng.randint(4, 60)
        ids = [1] + [rng.randrange(3, 128) for _ in range(n - 2)] + [2]
        cut = rng.randint(1, n - 2)
        examples.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    bins = pack_lengths([len(e) for e in examples], 128)
    out = []
    for impl in impls:
        dtype = torch.bfloat16 if impl == "flash_attention_2" else torch.float32
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            attn_implementation=impl,
        )
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
        losses, weights = [], []
        with torch.no_grad():
            for ex in examples:
                logits = model(input_ids=torch.tensor([ex.input_ids], device=device)).logits
                labels = torch.tensor([ex.labels], device=device)
                losses.append(loss_sum(logits, labels) / ex.n_targets)
                weights.append(ex.n_targets)
            w = torch.tensor(weights, dtype=torch.float64, device=device)
            expected = float((torch.stack(losses).double() * w).sum() / w.sum())
            # the trainer's own packed loss, one packed row at a time
            total, targets = 0.0, 0
            for b in bins:
                row = collate_rows([[examples[i] for i in b]], pad_id=0, length=128)
                row = dataclasses.replace(
                    row,
                    **{f.name: _to(getattr(row, f.name), device) for f in dataclasses.fields(row)},
                )
                total += float(packed_loss_sum(model, row))
                targets += row.n_targets
            packed = total / targets
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        diff = abs(packed - expected) / abs(expected)
        if diff > tol:
            raise AssertionError(f"{impl}: packed {packed:.6f} != separate {expected:.6f}")
        out.append(
            f"{impl} {dtype}: packed {packed:.6f} = separate {expected:.6f} (rel {diff:.1e})"
        )
    if device.startswith("cuda") and "flash_attention_2" not in impls:
        out.append("flash-attn not installed")
    return "; ".join(out)


def _to(value: Any, device: str) -> Any:
    return value.to(device) if hasattr(value, "to") else value


def fsdp_steps(cfg_path: Path, device: str) -> str:
    """2 training steps of the tiny config with the model sharded by FSDP2 (`training.model.
    shard_model`) in a process group of one (NCCL on CUDA, gloo on the CPU), under torchrun.
    The trainer itself shards only with several processes; this forces the sharded path."""
    import random

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from training.config import load_config
    from training.distributed import DistInfo
    from training.model import build_model, shard_model
    from training.packing import collate_rows, pack_lengths, packed_loss_sum
    from training.tokenize import IGNORE_INDEX, Example

    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    dev = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend)
    try:
        cfg = load_config(cfg_path)
        info = DistInfo(0, 1, 0, dev)
        model = shard_model(build_model(cfg, info), cfg, info)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        rng = random.Random(0)
        losses = []
        for _ in range(2):
            examples = []
            for _ in range(6):
                n = rng.randint(8, 120)
                ids = [1] + [rng.randrange(3, 32000) for _ in range(n - 2)] + [2]
                examples.append(Example(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
            bins = pack_lengths([len(e) for e in examples], 256)
            rows = [collate_rows([[examples[i] for i in b]], pad_id=0, length=256) for b in bins]
            n_targets = sum(r.n_targets for r in rows)
            loss = 0.0
            for row in rows:  # the trainer's packed loss, one row per micro-batch
                row = dataclasses.replace(
                    row,
                    **{f.name: _to(getattr(row, f.name), dev) for f in dataclasses.fields(row)},
                )
                part = packed_loss_sum(model, row) / n_targets
                part.backward()
                loss += float(part)
            opt.step()
            opt.zero_grad()
            losses.append(loss)
        kind = type(next(model.parameters())).__name__
        return (
            f"FSDP2 over {backend}, {dist.get_world_size()} process on {dev}, "
            f"{cfg.train.precision}: parameters are {kind}s; losses "
            + ", ".join(f"{x:.4f}" for x in losses)
        )
    finally:
        dist.destroy_process_group()


def fsdp_config(work: Path, tokenizer: Path, device: str) -> Path:
    """A tiny training config on the real samples in ../shared/data; 2 steps."""
    import yaml

    data = SHARED / "data"
    cfg = {
        "model": {
            "tokenizer": str(tokenizer),
            "from_config": {
                "vocab_size": 32000,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 1024,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
            "attn_implementation": "sdpa",
            "gradient_checkpointing": True,
        },
        "data": {
            "prepared_dir": str(work / "fsdp-data"),
            "max_length": 256,
            "sources": [
                {"name": "code", "path": str(data / "code_alpaca_2k.json"), "limit": 40},
                {
                    "name": "chat",
                    "path": str(data / "sharegpt-dummy_conversation.json"),
                    "limit": 12,
                },
            ],
        },
        "train": {
            "output_dir": str(work / "fsdp-run"),
            "micro_batch_size": 1,
            "global_batch_size": 2,
            "max_steps": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "precision": "bf16" if device.startswith("cuda") else "fp32",
            "save_every": 0,
            "progress_bar": False,
        },
        "export": {"dtype": "float32"},
    }
    path = work / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def internal(args: argparse.Namespace) -> int:
    """One in-process step; prints `RESULT: ...` last."""
    work = Path(args.work)
    if args.internal == "build":
        res = build_model(work / f"model-{args.size}", args.size, args.device, Path(args.tokenizer))
    elif args.internal in ("4bit", "8bit"):
        res = quant_reply(work / f"model-{args.size}", args.internal)
    elif args.internal == "qlora":
        res = qlora_steps(work / f"model-{args.size}", args.device, Path(args.tokenizer))
    elif args.internal == "roofline":
        res = roofline(json.loads(Path(args.report).read_text()), args.device)
    elif args.internal == "packed":
        res = packed_check(args.device)
    elif args.internal == "fsdp2":
        res = fsdp_steps(Path(args.report), args.device)
    else:
        raise UsageError(f"unknown internal step {args.internal!r}")
    print(f"RESULT: {res}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--wheels", help="folder of wheels to install (see above)")
    ap.add_argument("--work", default=None, help="where the model is saved (default: a temp dir)")
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (self-check)")
    ap.add_argument("--only", default=",".join(STEPS), help="steps to run, comma-separated")
    ap.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="override a step's time limit (repeatable)",
    )
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every limit")
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    ap.add_argument("--internal", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.internal:
        return args
    args.steps = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in args.steps if s not in LIMITS]:
        raise UsageError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    if args.limit_scale <= 0:
        raise UsageError("--limit-scale must be positive")
    args.limits = {k: v * args.limit_scale for k, v in LIMITS.items()}
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in LIMITS:
            raise UsageError(f"--limit {item}: unknown step {name!r}")
        try:
            args.limits[name] = float(value)
        except ValueError:
            raise UsageError(f"--limit {item}: {value!r} is not a number of seconds") from None
        if args.limits[name] <= 0:
            raise UsageError(f"--limit {item}: the limit must be positive")
    if args.wheels and not Path(args.wheels).is_dir():
        raise UsageError(f"--wheels {args.wheels}: no such folder")
    if (
        not (Path(args.tokenizer) / "tokenizer.model").is_file()
        and not (Path(args.tokenizer) / "tokenizer.json").is_file()
    ):
        raise UsageError(f"no Llama 2 tokenizer at {args.tokenizer} (the ../shared fixture)")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UsageError(f"--device {args.device}: use cuda, cuda:N or cpu")
    return args


def missing(modules: dict[str, str], env: dict[str, str]) -> list[str]:
    """pip names of `modules` the step environment cannot import."""
    code = (
        "import importlib.util,sys\n"
        "def has(m):\n"
        "    try:\n"
        "        return importlib.util.find_spec(m) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        "print(' '.join(m for m in sys.argv[1:] if not has(m)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True
    )
    return [modules[m] for m in out.stdout.split()]


def steps(args: argparse.Namespace, env: dict[str, str], site: Path) -> list[tuple[str, Any]]:
    """(name, thunk returning an Outcome) for every step, in order."""
    py = sys.executable
    me = [py, str(Path(__file__).resolve())]
    work = Path(args.work)
    model = work / f"model-{args.size}"
    common = ["--work", str(work), "--size", args.size, "--device", args.device]
    cuda = args.device.startswith("cuda")
    lim = args.limits

    def wheels() -> Outcome:
        gone = missing({**NEEDED, **(QUANT if cuda else {})}, env)
        if not gone:
            return Outcome("wheels", "ok", 0.0, "all present")
        if not args.wheels:
            return Outcome("wheels", "FAIL", 0.0, f"missing {' '.join(gone)}: pass --wheels DIR")
        cmd = [py, "-m", "pip", "install", "--no-index", "--find-links", args.wheels]
        cmd += ["--target", str(site), "--quiet", *gone]
        return run_step("wheels", cmd, lim["wheels"], env, lambda _: f"installed {' '.join(gone)}")

    def internal_step(name: str, *extra: str) -> Outcome:
        return run_step(
            name, [*me, "--internal", name, *common, *extra], lim[name], env, result_line
        )

    def needs_cuda(name: str, thunk: Callable[[], Outcome]) -> Callable[[], Outcome]:
        return thunk if cuda else lambda: Outcome(name, "skipped", 0.0, "needs CUDA")

    def p1p2() -> Outcome:
        cmd = [py, "bench/engine.py", "--model", str(model), "--device", args.device]
        cmd += ["--only", "12", "--rounds", "1", "--trials", "3"]
        return run_step("p1p2", cmd, lim["p1p2"], env, grep(r"^P[12] =", r"HF generate"))

    def bench() -> Outcome:
        report = work / "bench.json"
        cmd = [py, "-c", BENCH_TO_FILE, str(report)]
        benv = {**env, "MODEL": str(model), "DB_PATH": str(work / "bench.db")}
        t0 = time.perf_counter()
        first = run_step("bench", cmd, lim["bench"], benv, lambda _: "")
        if first.status != "ok":
            return first
        left = max(lim["bench"] - (time.perf_counter() - t0), 10.0)
        o = run_step(
            "bench",
            [*me, "--internal", "roofline", *common, "--report", str(report)],
            left,
            env,
            result_line,
        )
        o.seconds = time.perf_counter() - t0
        return o

    def quant() -> Outcome:
        cmd = [py, "bench/engine.py", "--model", str(model), "--device", args.device]
        cmd += ["--only", "q", "--q-tokens", "64"]
        return run_step("quant", cmd, lim["quant"], env, grep(r"^\s*(none|8bit|4bit) "))

    def mfu() -> Outcome:
        cmd = [py, "bench/training_data.py", "--size", "1b", "--seq-len", "4096", "--steps", "3"]
        return run_step("mfu", cmd, lim["mfu"], env, grep(r"MFU", r"tokens/s"))

    def fsdp2() -> Outcome:
        cfg = fsdp_config(work, Path(args.tokenizer), args.device)
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd += [str(Path(__file__).resolve()), "--internal", "fsdp2", *common, "--report", str(cfg)]
        return run_step("fsdp2", cmd, lim["fsdp2"], {**env, "OMP_NUM_THREADS": "1"}, result_line)

    return [
        ("wheels", wheels),
        ("build", lambda: internal_step("build", "--tokenizer", args.tokenizer)),
        ("p1p2", p1p2),
        ("4bit", needs_cuda("4bit", lambda: internal_step("4bit"))),
        ("8bit", needs_cuda("8bit", lambda: internal_step("8bit"))),
        ("quant", needs_cuda("quant", quant)),
        ("qlora", needs_cuda("qlora", lambda: internal_step("qlora", "--tokenizer", args.tokenizer))),
        ("bench", bench),
        ("mfu", needs_cuda("mfu", mfu)),
        ("packed", lambda: internal_step("packed")),
        ("fsdp2", fsdp2),
    ]


#: `hermes-bot bench --json` with its stdout written to a file (argv[1]).
BENCH_TO_FILE = (
    "import contextlib,sys;from bot.__main__ import main\n"
    "with open(sys.argv[1],'w') as f, contextlib.redirect_stdout(f):\n"
    "    code = main(['--env-file', '/dev/null', 'bench', '--json'])\n"
    "sys.exit(code)"
)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.internal:
            return internal(args)
    except UsageError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-"))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        site = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-site-")))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), str(site), os.environ.get("PYTHONPATH", "")])
            ),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        print(
            f"gpu_check: {args.size} model on {args.device}, work folder {args.work}, "
            f"steps {', '.join(args.steps)}",
            flush=True,
        )
        failed = 0
        for name, thunk in steps(args, env, site):
            if name not in args.steps:
                continue
            outcome = thunk()
            failed += outcome.status in ("FAIL", "TIMEOUT")
            print(outcome.line(), flush=True)
        print(f"gpu_check: {len(args.steps) - failed} of {len(args.steps)} steps without failure")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
