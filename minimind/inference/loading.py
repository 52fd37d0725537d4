"""Loading a trained model for inference: the model in eval mode on its device, and its tokenizer.

What `minimind generate | chat | eval | serve | export` open with --model: a training output
folder, a .pth, a .safetensors file or a Hugging Face style directory (model/checkpoint.py reads
them all).
"""
import sys
from pathlib import Path

import torch

from ..data.tokenizer import load_tokenizer
from ..devices import resolve_device
from ..model.checkpoint import describe_model, load_model
from ..model.lora import apply_adapter
from .weights import quantize_linears


def load_for_inference(model_arg, tokenizer=None, adapter=None, dtype=torch.float32, device="auto", quantize=None,
                       **shape_flags):
    """Resolve a --model argument to (model in eval mode on `device`, tokenizer).

    model_arg: what training writes, `output/final/` (a Hugging Face style directory) or
    `output/model_final.pth` (config.json beside it, or shape flags such as hidden_size and
    num_hidden_layers), or a .safetensors file. The tokenizer is `tokenizer` if given, else the
    one saved with the model (in its directory, beside the file, or in `final/` beside a .pth),
    else the bundled default. quantize="int8" gives every matrix int8 weights (weights.quantize_linears).
    shape_flags left as None are ignored. A line on stderr says which model family and shape was loaded.
    """
    path = Path(model_arg)
    device = resolve_device(device)  # a device this machine lacks fails before any loading
    model = load_model(path, dtype=dtype, **{k: v for k, v in shape_flags.items() if v is not None})
    print(f"model: {describe_model(model.config)}, from {path}", file=sys.stderr)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    if tokenizer is None:
        tokenizer = saved_tokenizer_dir(path)
        if tokenizer is None:
            print(f"note: no tokenizer saved with {path}; using the bundled default (--tokenizer DIR to choose)",
                  file=sys.stderr)
    model = model.to(device).eval()
    if quantize is not None:
        model = quantize_linears(model, quantize)
    return model, load_tokenizer(tokenizer)


def trained_context(config):
    """The longest sequence the model was trained on, as training records it in config.json
    (`max_seq_len`); the position limit when nothing is recorded (a model from elsewhere)."""
    recorded = getattr(config, "max_seq_len", None)
    return min(recorded, config.max_position_embeddings) if recorded else config.max_position_embeddings


def saved_tokenizer_dir(model_path):
    """The tokenizer saved with a model: in its directory, beside the file, or in `final/` beside a
    .pth (as training writes them); None when there is none."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    return next((str(c) for c in (folder, folder / "final") if (c / "tokenizer.json").is_file()), None)
