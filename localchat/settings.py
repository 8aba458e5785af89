"""The one place for defaults and machine facts that more than one layer reads.

Every layer may import this module (it imports nothing of ours): the sampling defaults a reply gets
when the user leaves a value out (CLI, page, terminal chat and API alike), the engine's sizes, the
page's concurrency limits, where caches and data live, what this CPU can do, and where the files
that ship beside the code (`models.yaml`, `assets/`) are, in a checkout or in an installed wheel.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# ---- a reply's sampling, when the user leaves a value out ----------------------------------------
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95

# ---- the engine ----------------------------------------------------------------------------------
DEFAULT_BLOCK_SIZE = 16
# What a GGUF's quantized matmuls round their inputs to, the default first (localchat/model/loader.py
# resolve_activations says why; kernels/quant.py ACTIVATION_BITS).
ACTIVATIONS = ("int16", "float32", "int8")
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
DEFAULT_CPU_KV_CACHE_GB = 1.0
DEFAULT_GPU_MEMORY_FRACTION = 0.6
MAX_SAMPLES = 64  # n (parallel samples) and beam width a request may ask for
MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (OpenAI's limit)
# An engine process hands its outputs to the app at most this often (first tokens and ends at once): each hand-over
# wakes the app, and the page updates only three times a second (benchmarks/NOTES.md session 11).
ENGINE_OUTPUT_INTERVAL_S = 0.1
SHUTDOWN_GRACE_S = 3  # on Ctrl-C/SIGTERM, how long running replies get to end and be saved before the server closes

# ---- the page ------------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"  # this machine only, unless the user asks for more
DEFAULT_PORT = 7860
UI_CONCURRENCY = 8  # the page's events Gradio's queue runs at once (a reply holds none while it streams)
UI_MAX_SAMPLES = 8  # samples shown side by side
# A streaming reply updates the page at most this often: three a second, ~25 tokens each at this model's speed on two
# cores. Each update costs ~20 ms of CPU in the browser and the app, taken from the engine on a two-core machine; five a
# second took ~0.17 of a core while a reply streamed, three ~0.12 (benchmarks/NOTES.md sessions 6 and 11).
UI_STREAM_INTERVAL_S = 1 / 3
# While a reply streams, one of its updates carries the open memory panel's data this often (localchat/ui/live.py);
# between replies the panel polls once a second on its own (assets/memory_panel.js keeps that figure itself).
UI_PANEL_INTERVAL_S = 1.0
UI_QUEUE_IDLE_S = 0.5  # the page's event queue waits for work, and looks anyway after this long (localchat/ui/quiet_queue.py)
UI_QUEUE_POLL_S = 0.02  # how often it looks for new events where Gradio's queue cannot be woken instead

# ---- the OpenAI-compatible API (localchat/api/) --------------------------------------------------
DEFAULT_API_PORT = 8000  # `localchat serve`; the app serves the API on the page's port
API_KEY_ENV = "LOCALCHAT_API_KEY"  # a key here (or --api-key) makes every /v1 call need "Authorization: Bearer KEY"
ENGINE_API_KEY_ENV = "LOCALCHAT_ENGINE_API_KEY"  # the key `localchat app --engine-url` sends to a remote server
API_COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's legacy endpoint
API_MAX_STOP = 16  # stop strings per request
API_MAX_COMPLETION_LOGPROBS = 5  # /v1/completions "logprobs" (alternatives per token), OpenAI's limit
REMOTE_METRICS_MAX_AGE_S = 1.0  # the memory panel re-reads a remote server's /metrics at most this often


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Converted models and built kernels: $LOCALCHAT_CACHE, else $XDG_CACHE_HOME/localchat, else ~/.cache/localchat."""
    return _env_path("LOCALCHAT_CACHE") or (_env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "localchat"


def data_dir() -> Path:
    """Conversations: $XDG_DATA_HOME/localchat, else ~/.local/share/localchat."""
    return (_env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "localchat"


def config_dir() -> Path:
    """The user's own settings (a model registry of their own): $XDG_CONFIG_HOME/localchat, else ~/.config/localchat."""
    return (_env_path("XDG_CONFIG_HOME") or Path.home() / ".config") / "localchat"


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_flags_line() -> str:
    """The kernel's list of this CPU's features (x86 "flags", Arm "Features"); "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def cpu_has(*features: str) -> bool:
    """Whether the CPU reports any of these features (e.g. "avx512_bf16", "amx_bf16")."""
    flags = set(cpu_flags_line().split())
    return any(f in flags for f in features)


def resource(name: str) -> Path:
    """A file or folder that ships beside the code: `models.yaml` or `assets`.

    In a checkout they sit at the repository's top level; a wheel carries them in localchat/_data
    (setup.py copies them there when the wheel is built).
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "_data" / name, package.parent / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{name} is missing from this installation of localchat (looked in {package / '_data'})")
