"""The engine layer: paged KV blocks (block_pool, block_manager), sequences and their scheduling,
sampling, the model runner, and the Engine with its background driver. It knows token sequences,
forks and prefixes; nothing of conversations."""

from localchat.lazy import lazy_attributes

# Each name's module, imported on first use (localchat/lazy.py says why).
_WHERE = {
    "EngineClient": "driver", "EngineDriver": "driver", "EngineStopped": "driver", "RequestFailed": "driver",
    "RequestStream": "driver", "Engine": "engine", "EngineConfig": "engine", "EngineProcess": "process",
    "EngineInfo": "requests", "Request": "requests", "RequestError": "requests", "CompletionOutput": "outputs",
    "RequestMetrics": "outputs", "RequestOutput": "outputs", "SamplingParams": "sampling_params",
}


__getattr__ = lazy_attributes(__name__, _WHERE)

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
