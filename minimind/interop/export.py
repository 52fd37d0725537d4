"""`minimind export`: a trained model in the formats other tools run.

    minimind export --model output/final --to llama --output_dir export/llama   # transformers, lm-eval
    minimind export --model output3/final --to qwen3 --output_dir export/qwen3  # MiniMind-3 models
    minimind export --model output/final --to gguf --output_dir export/gguf     # llama.cpp, Ollama
    minimind export --model output/final --to gguf --quantize q8_0 --output_dir export/gguf_q8

--to llama (MiniMind2) and --to qwen3 (MiniMind-3) write a directory that transformers opens
alone (a stock layout: interop/stock_layouts.py), with the tokenizer, its chat template, a
generation config and a model card (README.md: interop/model_card.py); --to gguf writes one GGUF
file (interop/gguf.py) and an Ollama Modelfile. A model that the target cannot represent exactly is
refused with one line saying why: never a file that computes something else. Everything is written
to a temporary folder first, then moved into --output_dir.
"""
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.tokenizer import default_eos_ids
from ..errors import UserError
from ..files import follow_umask
from .gguf import write_gguf_directory
from .model_card import write_model_card
from .stock_layouts import choose_layout, stock_config

TARGETS = ("llama", "qwen3", "gguf")


@contextmanager
def staged_directory(out_dir):
    """A temporary folder beside out_dir; its files move into out_dir only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} is a file; give a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield staging
        follow_umask(staging)  # safetensors writes model.safetensors private (0600)
        out_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def generation_config(model, tokenizer, model_path):
    """The model's generation_config.json if it has one, stopping where `minimind generate` stops."""
    from transformers import GenerationConfig

    folder = None
    if model_path is not None:
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    if folder is not None and (folder / "generation_config.json").exists():
        config = GenerationConfig.from_pretrained(str(folder))
    else:
        config = GenerationConfig(bos_token_id=model.config.bos_token_id)
    config.eos_token_id = default_eos_ids(tokenizer, model)
    config.pad_token_id = model.config.pad_token_id
    return config


def write_stock_weights(config, state, family, out_dir, dtype=torch.float32):
    """config.json and model.safetensors of the stock layout of `family` ("llama" or "qwen3") for a
    MiniMind config and state dict; returns the layout written."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    layout = choose_layout(config, state, family)
    fields = stock_config(config, layout)
    stock = AutoConfig.for_model(fields.pop("model_type"), **fields, dtype=str(dtype).removeprefix("torch."))
    tensors = {name: tensor.detach().to(dtype).contiguous().cpu() for name, tensor in layout.to_stock(state, config).items()}
    stock.save_pretrained(out_dir)
    update_json(Path(out_dir) / "config.json", older_rope_fields)
    save_file(tensors, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    return layout


def write_stock_directory(model, tokenizer, family, out_dir, dtype=torch.float32, model_path=None):
    """The stock layout's weights (write_stock_weights), generation_config.json and the tokenizer."""
    layout = write_stock_weights(model.config, model.state_dict(), family, out_dir, dtype)
    generation_config(model, tokenizer, model_path).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    update_json(Path(out_dir) / "tokenizer_config.json", lambda fields: portable_tokenizer_fields(fields, tokenizer))
    return layout


def update_json(path, change):
    """Rewrite a JSON file after `change(fields)` edits its dict in place."""
    fields = json.loads(path.read_text())
    change(fields)
    path.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")


def older_rope_fields(fields):
    """transformers 4 (and tools built on it: vLLM, llama.cpp's converter) read rope_theta and
    rope_scaling, not rope_parameters; without them they would silently use theta 10000."""
    rope = dict(fields["rope_parameters"])
    fields["rope_theta"] = rope.pop("rope_theta")
    fields["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}


def portable_tokenizer_fields(fields, tokenizer):
    """A tokenizer_config.json that transformers 4 opens as well: the fast tokenizer class and the
    chat template inline (transformers 5 names its class TokenizersBackend and keeps the template
    in chat_template.jinja, which is kept too)."""
    fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    for noise in ("backend", "is_local", "local_files_only"):
        fields.pop(noise, None)
    if tokenizer.chat_template:
        fields["chat_template"] = tokenizer.chat_template


def export(model, tokenizer, target, out_dir, dtype="float32", quantize=None, model_path=None):
    """Write `model` (float32) for `target` into out_dir; returns a line saying what was written.
    model_path: where the model was read from (its generation config, its runs for the card), if known."""
    with staged_directory(out_dir) as staging:
        if target == "gguf":
            stop = [tokenizer.convert_ids_to_tokens(i) for i in default_eos_ids(tokenizer, model)]
            path, architecture = write_gguf_directory(model, tokenizer, staging, quantize or dtype, stop)
            return f"wrote {Path(out_dir) / path.name} (llama.cpp architecture '{architecture}') and an Ollama Modelfile"
        layout = write_stock_directory(model, tokenizer, target, staging, getattr(torch, dtype), model_path)
        write_model_card(staging, model, tokenizer, layout, model_path, dtype, out_dir)
    return (f"wrote {out_dir}: {layout.architecture} (model_type '{layout.model_type}'), tokenizer, generation config "
            f"and a model card (README.md)")
