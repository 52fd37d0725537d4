"""Reading and writing model weights safely.

Accepted inputs for `load_model`:
- a `.pth`/`.pt` state dict as the original MiniMind writes it (float16 or float32), or one of our
  training checkpoints (a dict whose "model" entry is the state dict);
- a `.safetensors` file;
- a Hugging Face style directory (config.json + model.safetensors), as `save_pretrained` writes;
- a stock transformers layout (Llama, Mixtral, GraniteMoeShared, Qwen2-MoE), as `minimind export`
  writes it or as the ecosystem publishes models whose features MiniMind has (minimind.stock_layouts).

Nothing is unpickled beyond tensors (`torch.load(weights_only=True)`), and a checkpoint that does
not fit the model exactly is refused with the list of what is wrong: never a silent partial load.
"""
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from .config import MiniMindConfig
from .errors import CheckpointError
from .model import MiniMindForCausalLM
from .stock_layouts import LAYOUTS, TIED_KEY, minimind_config, minimind_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
SHARD_INDEX = "model.safetensors.index.json"
EMBED_KEY = "model.embed_tokens.weight"


def read_state_dict(path):
    """Tensors from a .pth/.pt/.bin or .safetensors file, or from the weights file of a directory."""
    path = Path(path)
    if path.is_dir():
        if (path / SHARD_INDEX).exists():
            return read_shards(path / SHARD_INDEX)
        for name in WEIGHT_FILES:
            if (path / name).exists():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: no weights file found (looked for {', '.join(WEIGHT_FILES)})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file, a pickle with code, a wrong format
        raise CheckpointError(f"{path}: cannot read as a weights file ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of our training checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def read_shards(index_file):
    """The tensors of a checkpoint split over several .safetensors files (model.safetensors.index.json)."""
    try:
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{index_file}: not a safetensors index ({type(error).__name__})") from None
    state = {}
    for shard in shards:
        state.update(read_state_dict(index_file.parent / shard))
    return state


def stock_fields(path):
    """The config.json fields of a stock transformers layout in (or beside) `path`, else None."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return None
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}:{error.lineno}: invalid JSON ({error.msg})") from None
    return fields if fields.get("model_type") in LAYOUTS else None


def read_model_state(path):
    """read_state_dict, with a stock layout's weight names turned into ours."""
    state, fields = read_state_dict(path), stock_fields(path)
    return state if fields is None else minimind_state_dict(state, fields)


def config_from_state_dict(state, **overrides):
    """Infer the architecture from tensor shapes. Head counts are not visible in shapes, so
    num_attention_heads comes from `overrides` (default 8) and key/value heads follow from k_proj."""
    embed = state.get(EMBED_KEY, state.get(TIED_KEY))
    if embed is None:
        raise CheckpointError(f"cannot infer the model shape: no {EMBED_KEY} in the checkpoint")
    layers = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    fields = {"vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "num_hidden_layers": len(layers)}
    heads = overrides.get("num_attention_heads", 8)
    head_dim = fields["hidden_size"] // heads
    k_proj = state.get("model.layers.0.self_attn.k_proj.weight")
    if k_proj is not None and head_dim:
        fields["num_key_value_heads"] = k_proj.shape[0] // head_dim
    experts = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", key))}
    if experts:
        shared = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", key))}
        fields.update(use_moe=True, n_routed_experts=len(experts), n_shared_experts=len(shared))
        fields["intermediate_size"] = state["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
    elif "model.layers.0.mlp.gate_proj.weight" in state:
        fields["intermediate_size"] = state["model.layers.0.mlp.gate_proj.weight"].shape[0]
    fields.update(overrides)
    return MiniMindConfig(**fields)


def describe_mismatch(model_state, state, limit=8):
    """The problems that keep `state` from loading into a model with `model_state`, or []."""
    def listing(keys):
        keys = sorted(keys)
        return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    missing = set(model_state) - set(state)
    unexpected = set(state) - set(model_state)
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(model_state[k].shape)})"
              for k in sorted(set(state) & set(model_state)) if state[k].shape != model_state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {len(shapes)}: " + "; ".join(shapes[:limit]) + (" ..." if len(shapes) > limit else ""))
    return problems


def load_weights(model, state, source="checkpoint"):
    """Copy `state` into `model` exactly; any missing, unexpected or mis-shaped key is an error.

    The lm_head shares its weight with the embedding: a checkpoint may carry both (the original's
    .pth files) or only the embedding (safetensors from save_pretrained)."""
    state = dict(state)
    if TIED_KEY in state and EMBED_KEY in state:
        if state[TIED_KEY].shape == state[EMBED_KEY].shape and not torch.equal(state[TIED_KEY], state[EMBED_KEY]):
            raise CheckpointError(f"{source}: lm_head.weight differs from model.embed_tokens.weight, but MiniMind ties them")
        state.pop(TIED_KEY)
    elif TIED_KEY in state:
        state[EMBED_KEY] = state.pop(TIED_KEY)
    model_state = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    problems = describe_mismatch(model_state, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({model.config.hidden_size} hidden, "
                              f"{model.config.num_hidden_layers} layers): " + "; ".join(problems)
                              + ". Pass the architecture flags that match the checkpoint, or omit them to infer them.")
    model.load_state_dict(state, strict=False)  # strictness checked above; lm_head is tied to the embedding
    return model


def load_config(path, **overrides):
    """The config of a checkpoint: config.json in (or beside) it, else inferred from tensor shapes."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if config_file.exists():
        try:
            fields = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_file}:{error.lineno}: invalid JSON ({error.msg})") from None
        if fields.get("model_type") in LAYOUTS:
            return minimind_config(fields, config_file, **overrides)
        if path.is_dir() or fields.get("model_type") == "minimind":
            fields.update(overrides)
            return MiniMindConfig(**fields)
    return config_from_state_dict(read_state_dict(path), **overrides)


def load_model(path, config=None, dtype=torch.float32, device="cpu", **overrides):
    """Load a MiniMind model from a .pth / .safetensors file or a Hugging Face style directory.

    config: a MiniMindConfig or a dict of its fields; by default taken from config.json in the
    directory (or beside the file), else inferred from the tensor shapes. `overrides` are config
    fields that replace those values (for example num_attention_heads for a bare .pth).
    float16 weights are upcast to `dtype` (float32 by default).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if config is None:
        config = load_config(path, **overrides)
    elif isinstance(config, dict) or overrides:
        fields = config if isinstance(config, dict) else config.to_dict()
        config = MiniMindConfig(**{**fields, **overrides})
    try:
        model = MiniMindForCausalLM(config)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_weights(model, read_model_state(path), source=str(path))
    return model.to(device=device, dtype=dtype).eval()


def atomic_write(path, write):
    """Write a file through a temporary name in the same folder and rename it into place, so a
    crash mid-write leaves the previous file intact. `write(tmp_path)` writes the content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(model, path):
    """The original MiniMind's format: torch.save of the state dict with original names,
    lm_head.weight included (loadable by the original code with strict=True)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
