"""How much of a training batch is real data, with and without packing, and what it buys.

    .venv/bin/python bench/training_data.py                      # CPU: real samples, small model
    python bench/training_data.py --size 1b --seq-len 4096       # on a GPU: ~1.1B Llama, bf16, MFU

1. Token efficiency on the real samples in ../shared/data (cleaned as `prepare` does, tokenised
   with the Llama 2 tokenizer): the share of non-pad tokens when batches are padded to their
   longest member, when every sample is padded to the sequence length, and when samples are
   packed into rows of the sequence length (the target is >= 98%).
2. Train-step throughput of a small Llama, packed rows vs padded batches of the same samples:
   real tokens per second of each, and the ratio. Both compute logits at every position so the
   comparison isolates packing.
3. With CUDA and `--size 1b`: a ~1.1B Llama (TinyLlama shape) at 4096 tokens, bf16 autocast,
   AdamW: tokens/s and MFU from the step's FLOPs (`training.flops`: 6N without the input
   embedding, plus attention over each document's own length, as document masking computes it).
4. FSDP2 gradient accumulation, 2 gloo processes on the CPU (`--no-fsdp` to skip): tokens/s of
   the same micro-batches when gradients are reduce-scattered after every micro-batch (what the
   trainer did before) and only after the last one (`set_requires_gradient_sync(False)` before).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.packing_reference import collate_padded, forward_packed, token_loss_sum  # noqa: E402
from training.config import (  # noqa: E402
    Config,  # noqa: E402
    DataConfig,
    SourceConfig,
)
from training.data import build_mix  # noqa: E402
from training.flops import PEAK_TFLOPS, matmul_params, mfu, step_flops  # noqa: E402
from training.model import set_grad_sync, shard_model  # noqa: E402
from training.packing import collate_rows, pack_lengths  # noqa: E402
from training.tokenize import Encoder, Example  # noqa: E402

SHARED = ROOT.parent / "shared"

SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}


def load_examples(data: Path, tokenizer_path: Path) -> tuple[list[Example], Encoder]:
    from transformers import AutoTokenizer

    enc = Encoder(AutoTokenizer.from_pretrained(str(tokenizer_path)))
    files = sorted(data.glob("*.json")) + sorted(data.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no .json/.jsonl files in {data}")
    cfg = DataConfig(
        sources=[SourceConfig(name=f.stem, path=str(f)) for f in files], max_length=4096
    )
    records, report = build_mix(cfg, enc.measure)
    print(report.markdown())
    return [enc.encode(r) for r in records], enc


def token_efficiency(
    lengths: list[int], seq_len: int, batch: int, seed: int = 0
) -> dict[str, float]:
    """Share of real tokens under three batching schemes."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = sum(lengths)
    longest = sum(
        max(lengths[i] for i in order[k : k + batch]) * len(order[k : k + batch])
        for k in range(0, len(order), batch)
    )
    fits = [n for n in lengths if n <= seq_len]
    rows = pack_lengths(fits, seq_len)
    return {
        "padded to longest in batch": real / longest,
        f"padded to {seq_len}": real / (len(lengths) * seq_len),
        f"packed into {seq_len}": sum(fits) / (len(rows) * seq_len),
        "packed rows": float(len(rows)),
    }


def make_model(size: str, device: torch.device, attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn,
        **SIZES[size],
    )
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    return model


def timed_steps(
    model: Any, batches: list[Any], step: Any, device: torch.device
) -> tuple[float, int]:
    """Seconds and real tokens for running `step` on every batch (after one warm-up step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step(model, batches[0])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    real = 0
    for b in batches[1:]:
        step(model, b)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += b.n_real
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, real


def packed_step(device: torch.device, autocast: Any) -> Any:
    def run(model: Any, b: Any) -> None:
        b = type(b)(
            b.input_ids.to(device),
            b.labels.to(device),
            b.position_ids.to(device),
            b.n_real,
            b.n_targets,
        )
        with autocast():
            loss = token_loss_sum(forward_packed(model, b), b.labels) / max(1, b.n_targets)
        loss.backward()

    return run


def padded_step(device: torch.device, autocast: Any) -> Any:
    def run(model: Any, b: Any) -> None:
        ids, labels, mask = (t.to(device) for t in (b.input_ids, b.labels, b.attention_mask))
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = token_loss_sum(logits, labels) / max(1, b.n_targets)
        loss.backward()

    return run


def throughput(
    examples: list[Example], pad: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """Real tokens/s of packed rows vs padded batches over the same samples."""
    seq = args.step_seq_len
    rng = random.Random(1)
    pool = [e for e in examples if len(e) <= seq]
    rng.shuffle(pool)
    # take enough samples for `steps + 1` packed rows, then batch the same samples both ways
    chosen: list[Example] = []
    total = 0
    while pool and total < (args.steps + 1) * seq * 0.97:
        chosen.append(pool.pop())
        total += len(chosen[-1])
    rows = pack_lengths([len(e) for e in chosen], seq)
    packed = [collate_rows([[chosen[i] for i in r]], pad, seq) for r in rows]
    per_batch = max(1, round(len(chosen) / len(rows)))  # about as many samples per step
    padded = [
        collate_padded(chosen[k : k + per_batch], pad) for k in range(0, len(chosen), per_batch)
    ]
    attn = "flash_attention_2" if args.flash else "sdpa"
    model = make_model(args.size, device, attn)
    bf16 = device.type == "cuda"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    t_packed, real_packed = timed_steps(model, packed, packed_step(device, autocast), device)
    t_padded, real_padded = timed_steps(model, padded, padded_step(device, autocast), device)
    cfg = model.config
    out = {
        "samples": float(len(chosen)),
        "packed rows": float(len(packed)),
        "padded batches": float(len(padded)),
        "packed tokens/s": real_packed / t_packed,
        "padded tokens/s": real_padded / t_padded,
    }
    out["packed/padded"] = out["packed tokens/s"] / out["padded tokens/s"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        n = matmul_params(model)
        timed = [len(chosen[i]) for r in rows[1:] for i in r]  # the documents of the timed steps
        flops = step_flops(n, cfg.num_hidden_layers, cfg.hidden_size, timed)
        out["matmul params (M)"] = n / 1e6
        out["GFLOP/token"] = flops / sum(timed) / 1e9
        if peak:  # the same documents both ways: one FLOP count, two times
            out["packed MFU"] = mfu(flops, t_packed, 1, peak * 1e12)
            out["padded MFU"] = mfu(flops * real_padded / real_packed, t_padded, 1, peak * 1e12)
    return out


def _fsdp_worker(
    rank: int, world: int, port: int, rows: list[list[Example]], args: Any, q: Any
) -> None:
    """One of `world` gloo processes: the same packed micro-batches, two sync policies."""
    import os

    import torch.distributed as dist

    from training.distributed import DistInfo
    from training.packing import packed_loss_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    cfg = Config()
    cfg.train.precision = "fp32"
    model = shard_model(make_model(args.fsdp_size, info.device, "sdpa"), cfg, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mine = rows[rank::world]
    per_step = args.micro_batches

    def run(sync_every: bool, steps: int) -> tuple[float, int]:
        real = 0
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(steps):
            batch = mine[s * per_step : (s + 1) * per_step]
            for k, micro in enumerate(batch):
                set_grad_sync(model, sync_every or k == len(batch) - 1)
                b = collate_rows([micro], 0, args.fsdp_seq_len)
                packed_loss_sum(model, b).backward()
                real += b.n_real
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0, real

    run(True, 1)  # warm-up
    results = {}
    for name, every in (
        ("tokens/s, sync every micro", True),
        ("tokens/s, sync last micro only", False),
    ):
        seconds, real = run(every, args.fsdp_steps)
        results[name] = real * world / seconds
    if rank == 0:
        q.put(results)
    dist.destroy_process_group()


def fsdp_sync(examples: list[Example], args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s over 2 gloo processes with and without gradient sync on non-final micro-batches."""
    import socket

    import torch.multiprocessing as mp

    world = 2
    seq = args.fsdp_seq_len
    pool = [e for e in examples if len(e) <= seq]
    random.Random(2).shuffle(pool)
    need = world * args.micro_batches * (args.fsdp_steps + 1)
    rows = [[pool[i] for i in b] for b in pack_lengths([len(e) for e in pool], seq)][:need]
    if len(rows) < need:
        raise SystemExit(f"not enough data for {need} rows of {seq} tokens")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _fsdp_worker, args=(world, port, rows, args, q), nprocs=world, start_method="spawn"
    )
    out = q.get()
    names = list(out)
    out["last-only/every"] = out[names[1]] / out[names[0]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "fixtures" / "llama2-tokenizer")
    p.add_argument("--seq-len", type=int, default=4096, help="packing length for the token share")
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded batch (share)")
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="model for the throughput part (default: small on CPU, 1b on CUDA)",
    )
    p.add_argument(
        "--step-seq-len",
        type=int,
        default=None,
        help="row length for the throughput part (default: 1024 on CPU, 4096 on CUDA)",
    )
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-fsdp", action="store_true", help="skip the 2-process FSDP2 sync part")
    p.add_argument("--micro-batches", type=int, default=4, help="FSDP part: per step per process")
    p.add_argument("--fsdp-steps", type=int, default=3, help="FSDP part: timed steps per policy")
    p.add_argument("--fsdp-size", choices=sorted(SIZES), default="small", help="FSDP part model")
    p.add_argument("--fsdp-seq-len", type=int, default=1024, help="FSDP part: tokens per row")
    args = p.parse_args(argv)
    if not args.data.is_dir() or not (args.tokenizer / "tokenizer.model").exists():
        print(f"need {args.data} and {args.tokenizer} (the ../shared folder)", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.size = args.size or ("1b" if cuda else "small")
    args.step_seq_len = args.step_seq_len or (4096 if cuda else 1024)
    import importlib.util

    args.flash = cuda and importlib.util.find_spec("flash_attn") is not None

    examples, enc = load_examples(args.data, args.tokenizer)
    lengths = [len(e) for e in examples]
    print(
        f"{len(examples)} examples, {sum(lengths)} tokens; length median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)}\n"
    )
    print("## Share of real (non-pad) tokens")
    for k, v in token_efficiency(lengths, args.seq_len, args.batch_size).items():
        print(f"  {k:<30} {v:.0f}" if k == "packed rows" else f"  {k:<30} {v:.2%}")
    if not args.no_throughput:
        print(
            f"\n## Train step, {args.size} Llama, rows of {args.step_seq_len}, {device}"
            f"{' bf16' if cuda else ' fp32'}, attention "
            f"{'flash_attention_2' if args.flash else 'sdpa'}"
        )
        show(throughput(examples, enc.pad, args, device))
    if not args.no_fsdp:
        print(
            f"\n## FSDP2 gradient accumulation, 2 gloo processes on the CPU, {args.fsdp_size} "
            f"Llama, {args.micro_batches} micro-batches of {args.fsdp_seq_len} tokens per step"
        )
        show(fsdp_sync(examples, args))
    return 0


def show(figures: dict[str, float]) -> None:
    for k, v in figures.items():
        if "MFU" in k:
            print(f"  {k:<30} {v:.1%}")
        elif "tokens/s" in k or "/" in k or "GFLOP" in k or "params" in k:
            print(f"  {k:<30} {v:,.2f}")
        else:
            print(f"  {k:<30} {v:.0f}")


if __name__ == "__main__":
    sys.exit(main())
