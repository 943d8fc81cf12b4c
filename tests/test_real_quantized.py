"""The real SmolLM2-135M-Instruct quantized by bitsandbytes on the CPU, and QLoRA on the CPU.

4-bit and 8-bit each load through the project's loader (`LocalEngine`), report a footprint well
under the fp32 weights, and answer the spider question with 8 (greedy fp32 SmolLM2 says "two
pairs of legs"; both quantized loads say eight). A short QLoRA run on the 4-bit base lowers the
loss, and its export (merged full-precision weights) is served and still answers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bot.engine import GenerationParams, LocalEngine
from tests.training_helpers import qa_records, write_json

pytest.importorskip("bitsandbytes", reason="the quantized paths need bitsandbytes (dev extra)")
pytestmark = pytest.mark.real_model

SPIDER = "How many legs does a spider have?"
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
#: The largest footprint each quantization may have, as a share of the fp32 weights.
LIMITS = {"4bit": 0.40, "8bit": 0.60}


def fp32_bytes(folder: Path) -> int:
    """What the model's parameters take in fp32, read from its safetensors headers."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            total += sum(prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return total * 4


def chat(engine: LocalEngine, text: str) -> str:
    """`text` as one user turn in the model's own chat template, ready for the reply."""
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def says_eight(text: str) -> bool:
    return bool(re.search(r"\b(8|eight)\b", text.lower()))


class ProxyTrap:
    """A local HTTP(S) proxy that only counts who connects: with HTTP_PROXY/HTTPS_PROXY pointing
    at it, any request the bot makes to the model hub (or anywhere) arrives here first."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_console_answers_quietly_offline(
    smollm2_hf: Path, quantization: str, cli_env: dict[str, str], tmp_path: Path
):
    """`QUANTIZATION=4bit|8bit hermes-bot console --model <SmolLM2 folder>`, greedy: the answer
    says eight; stderr shows the quantization and footprint and nothing else of bitsandbytes
    (no hub-kernel notice, no per-layer 8-bit cast warning, no progress bar); and nothing is
    requested over the network (the hub is not told to be offline: a proxy counts attempts)."""
    import subprocess
    import sys

    trap = ProxyTrap()
    env = {k: v for k, v in cli_env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        QUANTIZATION=quantization, TEMPERATURE="0", MAX_NEW_TOKENS="24",
        HTTP_PROXY=trap.url, HTTPS_PROXY=trap.url, http_proxy=trap.url, https_proxy=trap.url,
        NO_PROXY="", no_proxy="", HF_HOME=str(tmp_path / "hf-home"),
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bot", "console", "--model", str(smollm2_hf)],
            input=SPIDER + "\n", capture_output=True, text=True, env=env, cwd=tmp_path,
            timeout=1800,
        )
    finally:
        trap.close()
    assert done.returncode == 0, done.stderr
    assert says_eight(done.stdout), done.stdout
    started = re.search(rf"quantization {quantization}, device cpu, footprint (\d+) MB", done.stderr)
    assert started, done.stderr
    share = int(started.group(1)) * 2**20 / fp32_bytes(smollm2_hf)
    assert share < LIMITS[quantization], f"{quantization}: {share:.0%} of fp32"
    noise = [
        line for line in done.stderr.splitlines()
        if "WARNING" in line or "kernels-community" in line or "Loading weights" in line
        or "Traceback" in line
    ]
    assert noise == [], noise
    assert trap.connections == 0


@pytest.mark.slow
def test_qlora_on_the_cpu_lowers_the_loss_and_its_export_serves(smollm2_hf: Path, tmp_path):
    import asyncio

    from training.config import config_from_dict
    from training.data import build_mix, write_prepared
    from training.distributed import DistInfo
    from training.tokenize import Encoder
    from training.train import train

    data = write_json(tmp_path / "qa.json", qa_records(6))
    cfg = config_from_dict(
        {
            "model": {
                "name_or_path": str(smollm2_hf),
                "tokenizer": str(smollm2_hf),
                "attn_implementation": "sdpa",
                "gradient_checkpointing": False,
            },
            "lora": {
                "enabled": True, "load_in_4bit": True, "r": 8, "alpha": 16, "dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
            },
            "data": {
                "prepared_dir": str(tmp_path / "data"), "max_length": 64,
                "sources": [{"name": "qa", "path": str(data), "format": "alpaca"}],
            },
            "train": {
                "output_dir": str(tmp_path / "run"), "micro_batch_size": 1,
                "global_batch_size": 2, "max_steps": 4, "lr": 3e-3, "warmup_ratio": 0.0,
                "precision": "fp32", "save_every": 0, "progress_bar": False, "seed": 3,
                "export_dir": str(tmp_path / "hf"),
            },
            "export": {"dtype": "float32"},
        }
    )
    from transformers import AutoTokenizer

    records, report = build_mix(cfg.data, Encoder(AutoTokenizer.from_pretrained(smollm2_hf)).measure)
    write_prepared(Path(cfg.data.prepared_dir), records, report)
    cpu = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    result = train(cfg, info=cpu)
    assert len(result.losses) == 4
    assert result.losses[-1] < result.losses[0], result.losses
    assert result.export_dir is not None

    async def serve() -> tuple[str, str]:
        engine = LocalEngine(result.export_dir, quantization="none")
        await engine.start()
        try:
            # the merged export holds plain weights: nothing of bitsandbytes or peft is left
            assert engine.info.quantization == "none"
            assert not any("lora" in name for name, _ in engine.model.named_parameters())
            gen = engine.generate(chat(engine, SPIDER), GREEDY)
            return await gen.text_all(), gen.stats.finish_reason
        finally:
            await engine.close()

    text, _reason = asyncio.run(serve())
    assert "leg" in text.lower(), text


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
async def test_smollm2_quantized_loads_small_and_answers_on_discord(
    smollm2_hf: Path, quantization: str, world, tmp_path: Path
):
    """The project's loader (DTYPE and DEVICE_MAP auto) gives a footprint well under fp32 and a
    greedy answer of eight; the same engine inside the bot (PROMPT_FORMAT=auto renders SmolLM2's
    chat template) answers a mention on the fake Discord with eight."""
    from tests.bot_harness import bot_settings, running_bot
    from tests.test_chat import bot_messages, mention

    engine = LocalEngine(smollm2_hf, quantization=quantization)
    await engine.start()
    try:
        share = engine.info.footprint_mb * 2**20 / fp32_bytes(smollm2_hf)
        assert share < LIMITS[quantization], f"{quantization}: {share:.0%} of fp32"
        assert engine.info.device == "cpu" or torch.cuda.is_available()
        text = await engine.generate(chat(engine, SPIDER), GREEDY).text_all()
        assert says_eight(text), text

        settings = bot_settings(
            tmp_path, smollm2_hf, QUANTIZATION=quantization, MAX_NEW_TOKENS="24",
            REPLY_TIMEOUT="1800",  # a loaded CI machine is slow, not wrong
        )
        async with running_bot(world.fake, settings, engine=engine) as bot:
            assert bot.engine.info.quantization == quantization
            await mention(world, SPIDER)
            await world.fake.wait_for(
                lambda: bot_messages(world.fake, world.general.id), timeout=1800
            )
            await world.fake.wait_for(lambda: bot.conv.pending == 0, timeout=1800)
            reply = bot_messages(world.fake, world.general.id)[-1]
            assert says_eight(reply.content), reply.content
    finally:
        await engine.close()
