"""The engine layer: paged KV blocks (block_pool, block_manager), sequences and their scheduling,
sampling, the model runner, and the Engine with its background driver. It knows token sequences,
forks and prefixes; nothing of conversations."""

import importlib

# Names are looked up in their modules on first use: the app's page process imports the engine's client
# types (driver, requests, sampling_params) without torch and the model code, which only the engine process
# needs (its imports then run beside the page's; localchat/cli/app.py).
_WHERE = {
    "EngineClient": "driver", "EngineDriver": "driver", "EngineStopped": "driver", "RequestFailed": "driver",
    "RequestStream": "driver", "Engine": "engine", "EngineConfig": "engine", "EngineProcess": "process",
    "EngineInfo": "requests", "Request": "requests", "RequestError": "requests", "CompletionOutput": "outputs",
    "RequestMetrics": "outputs", "RequestOutput": "outputs", "SamplingParams": "sampling_params",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"localchat.engine.{_WHERE[name]}"), name)


__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineClient",
    "EngineConfig",
    "EngineDriver",
    "EngineInfo",
    "EngineProcess",
    "EngineStopped",
    "Request",
    "RequestError",
    "RequestFailed",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
]
