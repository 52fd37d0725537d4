"""minimind: train and fine-tune small MiniMind language models end to end.

    from minimind import MiniMindConfig, MiniMindForCausalLM, load_model

The names load on first use, so that `minimind --help` answers without importing torch. Importing
minimind.model.config / minimind.model.model (which these names do) registers the model with transformers'
AutoConfig and AutoModelForCausalLM for directories whose config.json says model_type "minimind".
"""
import importlib

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "load_model"]
__version__ = "0.1.0"

_HOMES = {"MiniMindConfig": "minimind.model.config", "MiniMindForCausalLM": "minimind.model.model",
          "load_model": "minimind.model.checkpoint"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'minimind' has no attribute {name!r}")
