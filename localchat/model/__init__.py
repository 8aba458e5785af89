"""The model layer: which models exist (registry), loading them (loader), the forward pass (llama) and
the one way text becomes prompt ids (chat_template)."""

import importlib

# Looked up on first use, as localchat/engine/__init__.py: chat_template and the registry need neither torch
# nor transformers.
_WHERE = {
    "UnsupportedModelError": "llama", "LoadedModel": "loader", "default_dtype": "loader", "load_model": "loader",
    "parse_dtype": "loader", "ModelNotFoundError": "registry", "ModelSpec": "registry", "ModelUnavailableError": "registry",
    "default_model_name": "registry", "load_registry": "registry", "resolve_model": "registry",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"localchat.model.{_WHERE[name]}"), name)


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
