"""Reading and writing model weights safely.

Accepted inputs for `load_model`, of either family (MiniMind2 or MiniMind-3, see config.py):
- a `.pth`/`.pt` state dict as the original MiniMind writes it (float16 or float32), or one of our
  training checkpoints (a dict whose "model" entry is the state dict);
- a `.safetensors` file;
- a Hugging Face style directory (config.json + model.safetensors), as `save_pretrained` writes;
- a stock transformers layout (Llama, Mixtral, GraniteMoeShared, Qwen2-MoE as MiniMind2; Qwen3 and
  Qwen3-MoE as MiniMind-3), as `minimind export` writes it or as the ecosystem publishes models whose
  features MiniMind has (minimind.stock_layouts).

The family comes from config.json (its `model_family`, a family's own field names, or the stock
layout's model_type), else from the tensors: only MiniMind-3 has per-head q/k norms
(`self_attn.q_norm.weight`); families.py says what tells each family. The loaded model says it in
`model.config.model_family` (and `describe_model(model.config)` in words).

Nothing is unpickled beyond tensors (`torch.load(weights_only=True)`), and a checkpoint that does
not fit the model exactly is refused with the list of what is wrong: never a silent partial load.
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from ..data.tokenizer import default_eos_ids
from ..errors import CheckpointError
from ..files import atomic_write, follow_umask
from ..interop.stock_layouts import LAYOUTS, TIED_KEY, family_of_layout, minimind_config, minimind_state_dict
from .config import MiniMindConfig
from .families import FAMILIES, family_of_fields, family_of_weights
from .model import MiniMindForCausalLM

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


def attention_shape(state, family, heads):
    """num_attention_heads, num_key_value_heads and head_dim from the projections. A family with a
    head_dim of its own (MiniMind-3) has a q_norm with one weight per head dimension, so every count
    is visible; otherwise (MiniMind2) the head count is not (`heads`, default 8), and the head
    dimension follows from it."""
    q_proj, k_proj = (state.get(f"model.layers.0.self_attn.{name}.weight") for name in ("q_proj", "k_proj"))
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    if family.own_head_dim and q_norm is not None and q_proj is not None:
        head_dim = q_norm.shape[0]
        fields = {"head_dim": head_dim, "num_attention_heads": q_proj.shape[0] // head_dim}
    else:
        heads = heads or 8
        fields = {"num_attention_heads": heads}
        head_dim = (q_proj.shape[0] if q_proj is not None else 0) // heads
    if k_proj is not None and head_dim:
        fields["num_key_value_heads"] = k_proj.shape[0] // head_dim
    return fields


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


def read_config_json(path):
    """(config.json in or beside `path`, its fields); the fields are None when there is no such file."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return config_file, None
    try:
        return config_file, json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}:{error.lineno}: invalid JSON ({error.msg})") from None


def is_stock_layout(fields):
    """Whether config.json fields are those of a stock transformers layout (stock_layouts.LAYOUTS)."""
    return fields is not None and fields.get("model_type") in LAYOUTS


def config_from_state_dict(state, **overrides):
    """Infer the architecture from tensor names and shapes. The family shows in the names (q/k norms);
    MiniMind-3 tensors give every size, MiniMind2's all but the head count, which comes from
    `overrides` (default 8). Not visible in any tensor: num_experts_per_tok, max_position_embeddings
    and rope_theta (the family's defaults unless `overrides` say otherwise)."""
    embed = state.get(EMBED_KEY, state.get(TIED_KEY))
    if embed is None:
        raise CheckpointError(f"cannot infer the model shape: no {EMBED_KEY} in the checkpoint")
    family = FAMILIES[overrides["model_family"]] if overrides.get("model_family") else family_of_weights(state)
    layers = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    fields = {"model_family": family.name, "vocab_size": embed.shape[0], "hidden_size": embed.shape[1],
              "num_hidden_layers": len(layers)}
    fields.update(attention_shape(state, family, overrides.get("num_attention_heads")))
    experts = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", key))}
    if experts:
        shared = {int(m.group(1)) for key in state if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", key))}
        fields.update(use_moe=True, n_routed_experts=len(experts), n_shared_experts=len(shared))
        width = state["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
        # MiniMind2's experts are as wide as its dense FFN; MiniMind-3's have their own field.
        fields[family.expert_width] = width
        if shared:
            fields["intermediate_size"] = state["model.layers.0.mlp.shared_experts.0.gate_proj.weight"].shape[0]
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
        family, weights_family = model.config.family, family_of_weights(state)
        hint = (f"The checkpoint is a {weights_family.title} model but the config says {family.title}; "
                f"set \"model_family\": \"{weights_family.name}\"" if family != weights_family else
                "Pass the architecture flags that match the checkpoint, or omit them to infer them")
        raise CheckpointError(f"{source} does not fit the model ({describe_model(model.config)}): "
                              + "; ".join(problems) + f". {hint}.")
    model.load_state_dict(state, strict=False)  # strictness checked above; lm_head is tied to the embedding
    return model


def load_config(path, state=None, config_json=None, **overrides):
    """The config of a checkpoint: config.json in (or beside) it, else inferred from tensor shapes.
    A config.json that does not name its family gets the one its fields (or else its tensors) show.
    `state`: the checkpoint's tensors, `config_json`: (file, fields) from read_config_json, when
    already read (else they are read if needed)."""
    path = Path(path)
    config_file, fields = config_json or read_config_json(path)
    if is_stock_layout(fields):
        check_same_family(path, family_of_layout(fields["model_type"]), overrides)
        return minimind_config(fields, config_file, **overrides)
    if fields is not None and (path.is_dir() or fields.get("model_type") == "minimind"):
        fields = with_family(fields, lambda: read_state_dict(path) if state is None else state)
        check_same_family(path, FAMILIES[fields["model_family"]], overrides)
        return MiniMindConfig(**{**fields, **overrides})
    state = read_state_dict(path) if state is None else state
    check_same_family(path, family_of_weights(state), overrides)
    return config_from_state_dict(state, **overrides)


def with_family(fields, weights):
    """Config fields with their model_family: as given, else as a family's own field names show, else
    as the tensors show (`weights()` gives them): a minimal config.json of a MiniMind-3 model
    names nothing of its family, its q/k norms do."""
    family = family_of_fields(fields) or family_of_weights(weights())
    return {**fields, "model_family": family.name}


def check_same_family(path, family, overrides):
    """A model_family override cannot turn a checkpoint of one family into the other."""
    wanted = overrides.get("model_family")
    if wanted and wanted != family.name:
        raise CheckpointError(f"{path}: the checkpoint is a {family.title} model but the config says "
                              f"{FAMILIES[wanted].title}; leave model_family out to load it as it is")


def describe_model(config):
    """One line for notices: 'MiniMind-3, dense, 2 layers, hidden 64, 4 heads (2 key/value)'."""
    kind = (f"MoE {config.n_routed_experts} experts (top-{config.num_experts_per_tok})" if config.use_moe
            else "dense")
    return (f"{config.family_name}, {kind}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads ({config.num_key_value_heads} key/value)")


def load_model(path, config=None, dtype=torch.float32, device="cpu", **overrides):
    """Load a MiniMind model, of either family, from a .pth / .safetensors file or a Hugging Face
    style directory.

    config: a MiniMindConfig or a dict of its fields (whose family, if it names none, the tensors
    tell); by default taken from config.json in the directory (or beside the file), else inferred
    from the tensor names and shapes. `overrides` are
    config fields that replace those values (for example num_attention_heads for a bare MiniMind2
    .pth). float16 weights are upcast to `dtype` (float32 by default). The family loaded is
    `model.config.model_family`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    state, config_json = read_state_dict(path), read_config_json(path)
    if is_stock_layout(config_json[1]):
        state = minimind_state_dict(state, config_json[1])  # a stock layout's weight names turned into ours
    if config is None:
        config = load_config(path, state=state, config_json=config_json, **overrides)
    elif isinstance(config, dict) or overrides:
        fields = with_family(config, lambda: state) if isinstance(config, dict) else config.to_dict()
        config = MiniMindConfig(**{**fields, **overrides})
    try:
        model = MiniMindForCausalLM(config)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_weights(model, state, source=str(path))
    return model.to(device=device, dtype=dtype).eval()


def save_state_dict(model, path, dtype=None):
    """The original MiniMind's format: torch.save of the state dict with original names,
    lm_head.weight included (loadable by the original code with strict=True). The tied lm_head
    shares the embedding's storage, so the file holds that matrix once. dtype: e.g. torch.float16,
    the precision in which the original project publishes its weights."""
    state = {name: tensor.detach().to("cpu", dtype or tensor.dtype) for name, tensor in model.state_dict().items()}
    if TIED_KEY in state and EMBED_KEY in state and torch.equal(state[TIED_KEY], state[EMBED_KEY]):
        state[TIED_KEY] = state[EMBED_KEY]
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_model_directory(model, tokenizer, path):
    """The Hugging Face style directory: model.safetensors, config.json with the model's code beside
    it (so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` needs no minimind),
    a generation_config.json that lists every token `minimind generate` stops at, the tokenizer."""
    model.generation_config.eos_token_id = default_eos_ids(tokenizer, model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return follow_umask(path)  # safetensors writes model.safetensors private (0600)
