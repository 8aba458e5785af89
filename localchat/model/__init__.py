"""The model layer: which models exist (registry), loading them (loader), the forward pass (llama) and
the one way text becomes prompt ids (chat_template)."""

from localchat.lazy import lazy_attributes

# Each name's module, imported on first use (localchat/lazy.py says why).
_WHERE = {
    "UnsupportedModelError": "llama", "LoadedModel": "loader", "default_dtype": "loader", "load_model": "loader",
    "parse_dtype": "loader", "ModelNotFoundError": "registry", "ModelSpec": "registry", "ModelUnavailableError": "registry",
    "default_model_name": "registry", "load_registry": "registry", "resolve_model": "registry",
}


__getattr__ = lazy_attributes(__name__, _WHERE)

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
