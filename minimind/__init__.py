"""minimind: train and fine-tune small MiniMind language models end to end."""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import MiniMindConfig
from .model import MiniMindForCausalLM

# After `import minimind`, AutoConfig / AutoModelForCausalLM open directories whose config.json
# says model_type "minimind".
AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)

from .checkpoint import load_model  # noqa: E402

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "load_model"]
__version__ = "0.1.0"
