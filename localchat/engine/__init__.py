"""The engine layer: paged KV blocks (block_pool, block_manager), sequences and their scheduling,
sampling, the model runner, and the Engine with its background driver. It knows token sequences,
forks and prefixes; nothing of conversations."""

from localchat.engine.driver import EngineClient, EngineDriver, EngineStopped, RequestFailed, RequestStream
from localchat.engine.engine import Engine, EngineConfig
from localchat.engine.process import EngineProcess
from localchat.engine.requests import EngineInfo, Request, RequestError
from localchat.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from localchat.engine.sampling_params import SamplingParams

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
