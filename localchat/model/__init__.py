"""The model layer: which models exist (registry), loading them (loader), the forward pass (llama) and
the one way text becomes prompt ids (chat_template)."""

from localchat.model.llama import UnsupportedModelError
from localchat.model.loader import LoadedModel, default_dtype, load_model, parse_dtype
from localchat.model.registry import (
    ModelNotFoundError,
    ModelSpec,
    ModelUnavailableError,
    default_model_name,
    load_registry,
    resolve_model,
)

__all__ = [
    "LoadedModel",
    "ModelNotFoundError",
    "ModelSpec",
    "ModelUnavailableError",
    "UnsupportedModelError",
    "default_dtype",
    "default_model_name",
    "load_model",
    "load_registry",
    "parse_dtype",
    "resolve_model",
]
