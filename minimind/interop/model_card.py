"""README.md for a `--to llama` / `--to qwen3` export: the model card a model hub shows.

Hugging Face's convention: YAML front matter (license, library_name, pipeline_tag, base_model,
tags), then Markdown. What the card says comes from files, never from guesses:

- the shape, from the model's config;
- the training, from each run's `run_config.yaml` and `metrics.jsonl` found beside the model (in its
  folder or the one above, where train.py writes them), following `pretrained_path` back through the
  runs it started from (pretrain -> SFT -> DPO);
- the held-out figures, from `eval_report.json` (`minimind eval` writes it beside the model);
- the chat template and stop tokens, from the tokenizer and the generation config written beside it.
What is not found is left out, and the card says where the figures would come from.
"""
import json
import re
from pathlib import Path

import yaml

from ..data.tokenizer import default_eos_ids
from ..training.output_dir import METRICS_NAME, RUN_CONFIG_NAME

EVAL_REPORT_NAME = "eval_report.json"  # `minimind eval` writes it beside the model
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MAX_STAGES = 16  # a pretrained_path chain longer than this is a loop


def write_model_card(out_dir, model, tokenizer, layout, source, dtype, shown_path):
    """README.md in out_dir for the export of `model` (read from `source`, the --model argument),
    written as `layout` (interop/stock_layouts.py); `shown_path` is where the user will find it. Without
    a source (a model built in Python) the card has no training or evaluation to tell."""
    runs = training_runs(source) if source else []
    report = read_json(model_folder(source) / EVAL_REPORT_NAME) if source else None
    card = "\n".join([front_matter(layout, runs), *body(model, tokenizer, layout, runs, report, dtype, source,
                                                           shown_path)])
    (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------- what is found beside the model

def model_folder(source):
    path = Path(source)
    return path if path.is_dir() else path.parent


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_of(weights):
    """(run_config dict, metrics rows, folder) of the training run that wrote `weights`, or None."""
    folder = model_folder(weights)
    for candidate in (folder, folder.parent):
        try:
            config = yaml.safe_load((candidate / RUN_CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            return config, metrics_rows(candidate / METRICS_NAME), candidate
    return None


def metrics_rows(path):
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a row cut by a kill
    return rows


def training_runs(source):
    """The runs that made the model, first to last: [(run_config, metrics rows)]."""
    runs, seen, weights = [], set(), source
    while weights and len(runs) < MAX_STAGES:
        found = run_of(weights)
        if found is None or found[2].resolve() in seen:
            break
        config, rows, folder = found
        seen.add(folder.resolve())
        runs.insert(0, (config, rows))
        weights = config.get("pretrained_path") or None
        if weights and not Path(weights).exists():
            break
    return runs


def base_model(runs):
    """The hub id the first run started from, if it names one (a local folder is no base_model: a hub
    refuses a card whose base_model is not a model id)."""
    start = runs[0][0].get("pretrained_path") if runs else None
    return start if start and HUB_ID.fullmatch(start) and not Path(start).exists() else None


# ---------------------------------------------------------------- the card

def front_matter(layout, runs):
    tags = ["minimind", layout.model_type]
    for config, _ in runs:
        tags += [tag for tag in (config.get("stage"), "lora" if config.get("lora_rank") else None) if tag]
    fields = {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation"}
    if base_model(runs):
        fields["base_model"] = base_model(runs)
    fields["tags"] = list(dict.fromkeys(tags))
    return f"---\n{yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)}---\n"


def body(model, tokenizer, layout, runs, report, dtype, source, shown_path):
    config = model.config
    family = config.family_name
    parameters = sum(p.numel() for p in model.parameters())
    yield f"# {Path(shown_path).name}\n"
    yield (f"A {parameters / 1e6:.2f}M-parameter language model of the {family} family "
           f"([MiniMind](https://github.com/jingyaogong/minimind)), trained and exported with minimind in the stock "
           f"`{layout.architecture}` layout: transformers opens it alone, without `trust_remote_code`. "
           f"The license in the header is the minimind project's (Apache-2.0): set the one your training "
           f"data allows before publishing.\n")
    yield from shape_section(config, layout, parameters, dtype)
    yield from training_section(runs)
    yield from evaluation_section(report)
    yield from template_section(tokenizer, model)
    yield from usage_section(shown_path, source)


def shape_section(config, layout, parameters, dtype):
    heads = f"{config.num_attention_heads} query, {config.num_key_value_heads} key/value"
    if config.num_key_value_heads < config.num_attention_heads:
        heads += " (grouped-query attention)"
    rows = [("architecture", f"`{layout.architecture}` (model_type `{layout.model_type}`)"),
            ("parameters", f"{parameters:,}"),
            ("layers x hidden size", f"{config.num_hidden_layers} x {config.hidden_size}"),
            ("attention heads", heads),
            ("feed-forward", feed_forward(config)),
            ("vocabulary", f"{config.vocab_size:,} tokens"),
            ("context", f"{config.max_position_embeddings:,} positions, RoPE theta {config.rope_theta:,.0f}"),
            ("weights", f"`model.safetensors`, {dtype}")]
    yield "## Model\n"
    yield "| | |\n| --- | --- |\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)


def feed_forward(config):
    swiglu = f"SwiGLU, width {config.intermediate_size}"
    if not config.use_moe:
        return swiglu
    shared = f", {config.n_shared_experts} shared" if getattr(config, "n_shared_experts", 0) else ""
    return f"mixture of {config.n_routed_experts} experts ({swiglu}), top {config.num_experts_per_tok}{shared}"


def training_section(runs):
    yield "## Training\n"
    if not runs:
        yield ("No `run_config.yaml` was found beside the exported model, so its training is not described "
               "here (train.py writes one in its --output_dir).\n")
        return
    yield "The runs that made this model, in order (from their `run_config.yaml` and `metrics.jsonl`):\n"
    yield "".join(f"{number}. {describe_run(config, rows)}\n" for number, (config, rows) in enumerate(runs, 1))


def describe_run(config, rows):
    """'sft on sft_train.jsonl: 1 epoch, ...' from a run's flags and its logged rows."""
    data = ", ".join(f"`{Path(path).name}`" for path in config.get("data") or [])
    what = f"**{config.get('stage') or 'pretrain'}** on {data}"
    if config.get("lora_rank"):
        what += f" (LoRA rank {config['lora_rank']}, merged)"
    steps = [row for row in rows if "loss" in row]
    length = (f"{config['max_steps']} optimizer steps" if config.get("max_steps")
              else f"{config.get('epochs')} epoch{'s' if config.get('epochs') != 1 else ''}")
    facts = [length, f"batch {config.get('batch_size')} x {config.get('accumulation_steps', 1)} accumulation, "
                     f"{config.get('max_seq_len')} tokens", f"learning rate {config.get('learning_rate'):g}"]
    if steps:
        facts.append(f"{steps[-1].get('tokens', 0):,} tokens in {steps[-1]['step']} steps")
    validation = [row for row in rows if "val_loss" in row]
    if len(validation) > 1:
        facts.append(f"validation loss {validation[0]['val_loss']:.4f} -> {validation[-1]['val_loss']:.4f}")
    return f"{what}: {'; '.join(facts)}"


def evaluation_section(report):
    yield "## Evaluation\n"
    if not report:
        yield ("No `eval_report.json` was found beside the exported model; `minimind eval --model MODEL --data "
               "FILE` writes one there, and a new export puts its figures here.\n")
        return
    figures = {name: value for name, value in report.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "max_seq_len"}
    yield (f"`minimind eval` on held-out data (`{Path(str(report.get('data', '?'))).name}`, "
           f"{report.get('stage', '?')} records, windows of {report.get('max_seq_len', '?')} tokens):\n")
    yield "| figure | value |\n| --- | --- |\n" + "".join(f"| {name} | {number(value)} |\n"
                                                         for name, value in figures.items())


def number(value):
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def template_section(tokenizer, model):
    if not tokenizer.chat_template:
        return
    stops = [tokenizer.convert_ids_to_tokens(i) for i in default_eos_ids(tokenizer, model)]
    example = tokenizer.apply_chat_template([{"role": "user", "content": "Add 3 and 4."}], tokenize=False,
                                            add_generation_prompt=True)
    yield "## Chat template\n"
    yield (f"The tokenizer carries it (`chat_template.jinja`, and inline in `tokenizer_config.json`); "
           f"generation stops at {', '.join(f'`{stop}`' for stop in stops)} (`generation_config.json`). "
           f"A user turn renders as:\n")
    yield f"```\n{example}\n```\n"
    yield f"<details><summary>The template</summary>\n\n```jinja\n{tokenizer.chat_template}\n```\n\n</details>\n"


def usage_section(path, source):
    yield "## Use\n"
    yield f"With transformers (replace `{path}` by the model's hub id once it is uploaded):\n"
    yield f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Add 3 and 4."}}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
'''
    yield ("With llama.cpp and Ollama, through a GGUF file: `minimind export --to gguf` writes one with an "
           "Ollama `Modelfile` beside it (llama.cpp's `convert_hf_to_gguf.py` reads this folder too):\n")
    yield f'''```bash
minimind export --model {source or "MODEL"} --to gguf --output_dir {Path(path).parent / "gguf"}
llama-cli -m {Path(path).parent / "gguf" / "model-f32.gguf"} -cnv
cd {Path(path).parent / "gguf"} && ollama create {ollama_name(path)} -f Modelfile && ollama run {ollama_name(path)}
```
'''


def ollama_name(path):
    return re.sub(r"[^a-z0-9_.-]+", "-", Path(path).name.lower()).strip("-") or "minimind"
