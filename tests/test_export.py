"""Export to stock transformers layouts and GGUF, and reading them back.

Checked against: transformers alone in a fresh process (logits, greedy tokens, chat template),
the GGUF file read back and run with numpy as llama.cpp runs it (gguf_reference.py), the
original MiniMind-3 numbers for the Qwen3 path (MiniMind-3 models exported by the command line),
and bit-exact round trips. The llama.cpp check itself (llama-cpp-python, built from source) and
lm-eval are slow tests: pytest -m slow (MiniMind2 shapes only).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from minimind import MiniMindConfig, MiniMindForCausalLM, load_model
from minimind.commands.main import main as cli_main
from minimind.data.tokenizer import load_tokenizer
from minimind.errors import CheckpointError
from minimind.inference.decoding import decode
from minimind.interop.export import export
from minimind.interop.gguf import write_gguf
from minimind.interop.stock_layouts import NotRepresentable
from minimind.model.checkpoint import load_config, save_model_directory

from .conftest import FIXTURES, MINIMIND2_TOKENIZER, MINIMIND3_CHECKPOINTS, MINIMIND3_TOKENIZER
from .gguf_reference import gguf_logits, logits_from, read_gguf
from .test_model import at_columns, expected, fixture_model, max_diff, minimind3_model

TOL = 1e-4
YARN = {"factor": 4, "beta_fast": 4, "beta_slow": 1, "original_max_position_embeddings": 2048}
# Shapes beside the fixture's: odd head counts, every MoE router/shared-expert combination, YaRN on.
SHAPES = {
    "gqa_3_1": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
    "mha_5": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=5),
    "moe_shared": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "moe_two_shared": dict(use_moe=True, n_routed_experts=3, num_experts_per_tok=2, n_shared_experts=2),
    "moe_no_shared": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0),
    "moe_top1": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0),
    "moe_raw_top2": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0, norm_topk_prob=False),
    "yarn": dict(max_position_embeddings=4096, inference_rope_scaling=True, yarn_parameters=YARN),
}
LAYOUT_OF = {"gqa_3_1": "llama", "mha_5": "llama", "moe_shared": "granitemoeshared", "moe_two_shared": "granitemoeshared",
             "moe_no_shared": "mixtral", "moe_top1": "qwen2_moe", "moe_raw_top2": "qwen2_moe", "yarn": "llama"}
GGUF_ARCH_OF = {"gqa_3_1": "llama", "mha_5": "llama", "moe_shared": "granitemoe", "moe_two_shared": "granitemoe",
                "moe_no_shared": "llama", "moe_top1": "bailingmoe", "moe_raw_top2": "bailingmoe", "yarn": "llama"}
# MiniMind-3: the original's fixtures, and shapes beside them: a head_dim of its own, a top-1 router
# (renormalised to weight 1) with experts narrower than the dense width, and a YaRN that
# transformers' `yarn` ramps differently (theta 500: its ramp end is clamped at another pair).
MINIMIND3_FIXTURES = ("dense3_tiny", "moe3_tiny", "dense3_yarn_tiny")
MINIMIND3_SHAPES = {
    "m3_head_dim": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "m3_moe_top1": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=32),
    "m3_yarn_longrope": dict(rope_theta=500.0, max_position_embeddings=4096, inference_rope_scaling=True),
}
# what transformers opens each as: (class, rope type)
QWEN3_OF = {"dense3_tiny": ("Qwen3ForCausalLM", "default"), "moe3_tiny": ("Qwen3MoeForCausalLM", "default"),
            "dense3_yarn_tiny": ("Qwen3ForCausalLM", "yarn"), "m3_head_dim": ("Qwen3ForCausalLM", "default"),
            "m3_moe_top1": ("Qwen3MoeForCausalLM", "default"), "m3_yarn_longrope": ("Qwen3ForCausalLM", "longrope")}
IDS = [1, 20, 300, 4000, 5, 6, 7, 8, 9, 10, 2000, 3000, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
       57, 58, 59, 60, 61, 62, 63, 64]


def random_model(seed=0, **shape):
    """A tiny model with random norms, a sharp router and sharp attention (q and k scaled up, or with
    q/k norms their gains, so that positions, hence the rotary layout and YaRN, visibly change the
    logits)."""
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=6400,
                  max_position_embeddings=512, intermediate_size=96)
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**{**fields, **shape})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.add_(torch.randn_like(param) * 0.1).mul_(4)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                param.mul_(4)
    return model


def logits_of(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINIMIND2_TOKENIZER)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """{name: (model, its --to llama directory)} for the fixture and SHAPES, written once."""
    root = tmp_path_factory.mktemp("exported")
    models = {"fixture": fixture_model(FIXTURES / "minimind2", "dense_tiny")}
    models.update({name: random_model(i, **shape) for i, (name, shape) in enumerate(SHAPES.items())})
    for name, model in models.items():
        export(model, tokenizer, "llama", root / name)
    return {name: (model, root / name) for name, model in models.items()}


@pytest.fixture(scope="module")
def tokenizer3():
    return load_tokenizer(MINIMIND3_TOKENIZER)


@pytest.fixture(scope="module")
def exported3(tmp_path_factory, tokenizer3):
    """{name: (model, its --to qwen3 directory)} for the MiniMind-3 fixtures and MINIMIND3_SHAPES:
    each saved as training saves it (minimind/<name>), then exported by the command line."""
    root = tmp_path_factory.mktemp("exported3")
    models = {name: minimind3_model(name) for name in MINIMIND3_FIXTURES}
    models.update({name: random_model(i, model_family="minimind3", **shape)
                   for i, (name, shape) in enumerate(MINIMIND3_SHAPES.items())})
    for name, model in models.items():
        save_model_directory(model, tokenizer3, root / "minimind" / name)
        assert cli_main(["export", "--model", str(root / "minimind" / name), "--to", "qwen3",
                         "--output_dir", str(root / name)]) == 0
    return {name: (model, root / name) for name, model in models.items()}


def source_of(exported_directory):
    """The MiniMind directory an exported3 export was made from."""
    return exported_directory.parent / "minimind" / exported_directory.name


# ---------------------------------------------------------------- transformers alone

FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)  # tiny models; as conftest.one_thread, for a busy 2-core machine
    jobs, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    results = {}
    for name, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["directory"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(job["directory"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            greedy = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            reference = model(torch.tensor(job["reference_ids"])).logits if job["reference_ids"] else None
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好, hello"}], tokenize=False,
                                             add_generation_prompt=True)
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        results[name] = dict(logits=logits, greedy=greedy[0, 8:], chat=chat, tied=tied, cls=type(model).__name__,
                             eos=model.generation_config.eos_token_id, reference=reference,
                             rope=model.config.rope_parameters["rope_type"])
    assert "minimind" not in sys.modules, "the export must not need minimind"
    torch.save(results, out)
""")


@pytest.fixture(scope="module")
def fresh_results(exported, exported3, tmp_path_factory):
    """What one fresh process with transformers only (no import minimind, no trust_remote_code)
    computes with every --to llama and --to qwen3 export: {name: results}; the MiniMind-3 fixtures
    also on their reference inputs."""
    jobs = {name: {"directory": str(directory), "reference_ids": None} for name, (_, directory) in exported.items()}
    for name, (_, directory) in exported3.items():
        reference = expected(MINIMIND3_CHECKPOINTS, name)["input_ids"].tolist() if name in MINIMIND3_FIXTURES else None
        jobs[name] = {"directory": str(directory), "reference_ids": reference}
    out = tmp_path_factory.mktemp("fresh") / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs), json.dumps(IDS), str(out)],
                   check=True, cwd=out.parent, env=env, timeout=300)
    return torch.load(out, weights_only=True)


def greedy_tokens(model):
    return torch.stack(list(decode(model, torch.tensor([IDS[:8]]), max_new_tokens=12)), 1)[0]


@pytest.mark.long  # a fresh process opens every export (fresh_results)
def test_transformers_alone_reproduces_logits_and_greedy_tokens(exported, tokenizer, fresh_results):
    """A fresh process with transformers only opens every --to llama export: logits within 1e-4 in
    float32, the same greedy tokens, the chat template, tied weights."""
    ours_chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好, hello"}], tokenize=False,
                                              add_generation_prompt=True)
    for name, (model, _) in exported.items():
        result = fresh_results[name]
        assert max_diff(result["logits"], logits_of(model)) <= TOL, name
        assert torch.equal(result["greedy"], greedy_tokens(model)), name
        assert result["tied"] and result["chat"] == ours_chat and result["eos"] == [0, 2], name
        expected_class = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                          "granitemoeshared": "GraniteMoeSharedForCausalLM"}[LAYOUT_OF.get(name, "llama")]
        assert result["cls"] == expected_class, name


@pytest.mark.long
def test_transformers_alone_runs_minimind3_exports_as_qwen3(exported3, tokenizer3, fresh_results):
    """`minimind export --to qwen3` of MiniMind-3 models, opened by transformers alone as Qwen3 /
    Qwen3-MoE: the logits the original MiniMind-3 code computed (fixtures) and ours within 1e-4, our
    greedy tokens, MiniMind-3's chat template; YaRN as transformers' `yarn` where its formula is ours,
    else as longrope."""
    chat = tokenizer3.apply_chat_template([{"role": "user", "content": "你好, hello"}], tokenize=False,
                                          add_generation_prompt=True)
    for name, (model, _) in exported3.items():
        result = fresh_results[name]
        assert (result["cls"], result["rope"]) == QWEN3_OF[name], name
        assert max_diff(result["logits"], logits_of(model)) <= TOL, name
        assert torch.equal(result["greedy"], greedy_tokens(model)), name
        assert result["tied"] and result["chat"] == chat and result["eos"] == [0, 2], name
        if name in MINIMIND3_FIXTURES:
            ref = expected(MINIMIND3_CHECKPOINTS, name)
            assert max_diff(at_columns(result["reference"], ref), ref["logits"]) <= TOL, name


def test_minimind3_yarn_shapes_depend_on_their_yarn():
    """The YaRN check above can fail: with the YaRN off these models compute other logits."""
    for name, shape in MINIMIND3_SHAPES.items():
        if shape.get("inference_rope_scaling"):
            seed = list(MINIMIND3_SHAPES).index(name)
            yarn = random_model(seed, model_family="minimind3", **shape)
            plain = random_model(seed, model_family="minimind3", **{**shape, "inference_rope_scaling": False})
            assert max_diff(logits_of(plain), logits_of(yarn)) > 1e-3, name


def test_fixture_export_matches_the_original_code(exported):
    """Through transformers' Llama, the numbers the original MiniMind2 code computed."""
    ref = expected(FIXTURES / "minimind2", "dense_tiny")
    llama = AutoModelForCausalLM.from_pretrained(exported["fixture"][1]).eval()
    with torch.no_grad():
        assert max_diff(at_columns(llama(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL


def test_yarn_is_exported_as_longrope_with_our_factors(exported):
    """The original's YaRN variant changes these logits (so the check below can fail), and the
    export carries it as per-pair longrope factors with no attention scaling."""
    model, directory = exported["yarn"]
    plain = random_model(list(SHAPES).index("yarn"), **{**SHAPES["yarn"], "inference_rope_scaling": False})
    assert max_diff(logits_of(plain), logits_of(model)) > 5e-3
    rope = AutoConfig.from_pretrained(directory).rope_parameters
    assert rope["rope_type"] == "longrope" and rope["attention_factor"] == 1.0
    assert rope["short_factor"] == rope["long_factor"] and rope["short_factor"][0] == 1.0
    assert rope["short_factor"][-1] == pytest.approx(4.0)  # slow pairs divided by the factor


# ---------------------------------------------------------------- and back

def test_export_and_reload_is_bit_exact(exported):
    """MiniMind -> stock layout -> MiniMind: every tensor and the logits identical."""
    for name, (model, directory) in exported.items():
        back = load_model(directory)
        assert back.state_dict().keys() == model.state_dict().keys(), name
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items()), name
        assert torch.equal(logits_of(back), logits_of(model)), name
        if name == "yarn":
            assert back.config.inference_rope_scaling and back.config.yarn_parameters == YARN


def test_minimind3_qwen3_export_and_reload_is_bit_exact(exported3):
    """MiniMind-3 -> Qwen3 / Qwen3-MoE -> MiniMind-3: every tensor, the logits and the config fields
    (head_dim, router, expert widths, YaRN parameters) identical."""
    for name, (model, directory) in exported3.items():
        back = load_model(directory)
        assert back.config.model_family == "minimind3", name
        assert back.state_dict().keys() == model.state_dict().keys(), name
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items()), name
        assert torch.equal(logits_of(back), logits_of(model)), name
        ignored = ("_name_or_path", "architectures", "dtype", "transformers_version", "auto_map")
        assert {k: v for k, v in back.config.to_dict().items() if k not in ignored} == \
            {k: v for k, v in model.config.to_dict().items() if k not in ignored}, name


def test_minimind3_bfloat16_export_is_exact_in_float32(exported3, tokenizer3, tmp_path):
    """--dtype bfloat16: the file holds the rounded weights exactly; run in float32, transformers'
    Qwen3-MoE computes what our model computes with them (the norms' rounding order, MiniMind-3's
    scale-then-cast against Qwen3's cast-then-scale, only matters when running in bfloat16)."""
    model = exported3["moe3_tiny"][0]
    export(model, tokenizer3, "qwen3", tmp_path, dtype="bfloat16")
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    rounded = load_model(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k].bfloat16().float()) for k, v in rounded.state_dict().items())
    with torch.no_grad():
        assert max_diff(qwen(torch.tensor([IDS])).logits[0], logits_of(rounded)) <= TOL


def test_a_llama_from_transformers_loads_and_runs_in_every_verb(tmp_path):
    """A LlamaForCausalLM saved by transformers itself (tied, no biases) is a MiniMind model:
    load_model, the config training reads for --pretrained_path, and the command line verbs."""
    config = LlamaConfig(vocab_size=6400, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=256, rope_theta=5e5, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    load_tokenizer(MINIMIND2_TOKENIZER).save_pretrained(tmp_path / "llama")
    ours = load_model(tmp_path / "llama")
    assert (ours.config.rope_theta, ours.config.rms_norm_eps, ours.config.num_key_value_heads) == (5e5, 1e-6, 2)
    with torch.no_grad():
        assert max_diff(ours(torch.tensor([IDS])).logits, llama(torch.tensor([IDS])).logits) <= TOL
    assert load_config(tmp_path / "llama").hidden_size == 48  # what train.py --pretrained_path reads first
    assert cli_main(["generate", "--model", str(tmp_path / "llama"), "--prompt", "hello", "--max_new_tokens", "3",
                     "--temperature", "0"]) == 0
    assert cli_main(["export", "--model", str(tmp_path / "llama"), "--to", "gguf", "--output_dir", str(tmp_path / "g")]) == 0


def edited(directory, change_config=None, change_weights=None):
    """An export directory with its config.json fields or its weights edited in place."""
    from safetensors.torch import load_file, save_file

    fields = json.loads((directory / "config.json").read_text())
    (change_config or (lambda f: None))(fields)
    (directory / "config.json").write_text(json.dumps(fields))
    weights = load_file(directory / "model.safetensors")
    (change_weights or (lambda w: None))(weights)
    save_file(weights, directory / "model.safetensors")
    return directory


def stock_directory(tmp_path, change_config=None, change_weights=None, **shape):
    """A --to llama export of a tiny model, with its config.json or weights edited."""
    export(random_model(**shape), load_tokenizer(MINIMIND2_TOKENIZER), "llama", tmp_path / "edited")
    return edited(tmp_path / "edited", change_config, change_weights)


def untie(weights):
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(attention_bias=True), "bias terms"),
    (lambda f: f.update(head_dim=32), "head_dim 32"),
    (lambda f: f.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, rope_scaling=None),
     "rope type 'llama3'"),
    (lambda f: f.update(model_type="qwen3"), "without per-head q/k norm weights"),
])
def test_stock_features_minimind_lacks_are_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(stock_directory(tmp_path, change))


def test_a_gated_shared_expert_is_refused(tmp_path):
    """Qwen2-MoE's shared expert is written as zeros; a real one (sigmoid-gated) has no MiniMind form."""
    def shared_expert(weights):
        weights["model.layers.0.mlp.shared_expert.up_proj.weight"] += 1

    directory = stock_directory(tmp_path, change_weights=shared_expert, **SHAPES["moe_top1"])
    with pytest.raises(CheckpointError, match="sigmoid-gated shared expert"):
        load_model(directory)


def test_an_untied_lm_head_is_refused(tmp_path):
    directory = stock_directory(tmp_path, lambda f: f.update(tie_word_embeddings=False), untie)
    with pytest.raises(CheckpointError, match="differs from model.embed_tokens.weight"):
        load_model(directory)


# ---------------------------------------------------------------- what cannot be represented

def test_layouts_that_would_compute_something_else_are_refused(tmp_path, tokenizer):
    with pytest.raises(NotRepresentable, match="Qwen3 applies an RMSNorm to every query and key head"):
        export(random_model(), tokenizer, "qwen3", tmp_path / "q")
    shared_top1 = random_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=1)
    with pytest.raises(NotRepresentable, match="sigmoid"):
        export(shared_top1, tokenizer, "llama", tmp_path / "s")
    raw_yarn = random_model(**SHAPES["moe_top1"], **{k: v for k, v in SHAPES["yarn"].items()})
    with pytest.raises(NotRepresentable, match="bailingmoe, which has no per-pair rope frequencies"):
        export(raw_yarn, tokenizer, "gguf", tmp_path / "g")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_export_command_errors_are_one_line(tmp_path, capsys):
    fixture = str(FIXTURES / "minimind2" / "dense_tiny_hf")
    assert cli_main(["export", "--model", fixture, "--to", "qwen3", "--output_dir", str(tmp_path / "q")]) == 2
    assert cli_main(["export", "--model", fixture, "--to", "llama", "--quantize", "q8_0",
                     "--output_dir", str(tmp_path / "l")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "--to qwen3: Qwen3 applies" in errors[0] and "--quantize applies to --to gguf" in errors[1]
    assert not (tmp_path / "q").exists() and not (tmp_path / "l").exists()



# ---------------------------------------------------------------- the model card

TINY_RUN = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--num_key_value_heads", "2",
            "--max_seq_len", "64", "--eval_max_tokens", "512", "--sample_tokens", "0", "--report_to", "none",
            "--device", "cpu"]
DATA = Path(__file__).resolve().parents[1] / "data"


def card_of(directory):
    """(front matter dict, Markdown body) of an export's README.md."""
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.mark.long
def test_a_llama_export_has_a_model_card_with_the_runs_figures(tmp_path, monkeypatch):
    """Pretrain, SFT on it, eval, export: the card's front matter follows the hub's convention, its body
    holds the shape, both runs with their data and logged losses, the eval report's figures and the
    chat template, and its transformers snippet runs as written."""
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    base, sft, out = tmp_path / "base", tmp_path / "sft", tmp_path / "export" / "tiny-chat"
    assert cli_main(["train", *TINY_RUN, "--max_steps", "3", "--output_dir", str(base)]) == 0
    assert cli_main(["train", *TINY_RUN, "--data", str(DATA / "sft_train.jsonl"), "--pretrained_path",
                     str(base / "final"), "--max_steps", "2", "--output_dir", str(sft)]) == 0
    assert cli_main(["eval", "--model", str(sft / "final"), "--data", str(DATA / "sft_eval.jsonl"),
                     "--max_samples", "3"]) == 0
    assert cli_main(["export", "--model", str(sft / "final"), "--to", "llama", "--output_dir", str(out)]) == 0
    header, body = card_of(out)
    assert header["license"] == "apache-2.0" and header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "text-generation" and "base_model" not in header  # a local folder is none
    assert {"minimind", "llama", "pretrain", "sft"} <= set(header["tags"])
    assert "| layers x hidden size | 2 x 32 |" in body and "| attention heads | 4 query, 2 key/value" in body
    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for name, run in (("base", base), ("sft", sft))}
    for name, stage, data in (("base", "pretrain", "pretrain.jsonl"), ("sft", "sft", "sft_train.jsonl")):
        val = [row["val_loss"] for row in rows[name] if "val_loss" in row]
        tokens = [row["tokens"] for row in rows[name] if "loss" in row][-1]
        assert (f"**{stage}** on `{data}`" in body and f"validation loss {val[0]:.4f} -> {val[-1]:.4f}" in body
                and f"{tokens:,} tokens" in body), (name, body)
    assert body.index("**pretrain**") < body.index("**sft**")
    report = json.loads((sft / "final" / "eval_report.json").read_text())
    assert f"| answer_loss | {report['answer_loss']:.4f} |" in body and "| conversations | 3 |" in body
    assert load_tokenizer(out).chat_template in body and "<|im_start|>user\nAdd 3 and 4.<|im_end|>" in body
    assert "llama-cli -m" in body and "ollama create tiny-chat -f Modelfile" in body
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    code = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]


def test_a_qwen3_export_without_its_run_says_where_the_figures_would_come_from(tmp_path):
    out = tmp_path / "qwen3"
    model_dir = tmp_path / "mm3"
    torch.manual_seed(0)
    save_model_directory(MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", hidden_size=32,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, vocab_size=6400)),
                         load_tokenizer(MINIMIND3_TOKENIZER), model_dir)
    assert cli_main(["export", "--model", str(model_dir), "--to", "qwen3", "--output_dir", str(out)]) == 0
    header, body = card_of(out)
    assert header["tags"] == ["minimind", "qwen3"] and "| architecture | `Qwen3ForCausalLM` (model_type `qwen3`) |" in body
    assert "No `run_config.yaml` was found" in body and "No `eval_report.json` was found" in body
    assert load_tokenizer(out).chat_template in body


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("name", ["fixture", *SHAPES])
def test_gguf_read_back_reproduces_our_logits(exported, tokenizer, tmp_path, name):
    """gguf's reader + a numpy forward pass with llama.cpp's conventions = our logits (float32)."""
    model = exported[name][0]
    message = export(model, tokenizer, "gguf", tmp_path)
    assert f"architecture '{GGUF_ARCH_OF.get(name, 'llama')}'" in message
    ours = logits_of(model).numpy()
    assert np.abs(gguf_logits(tmp_path / "model-f32.gguf", IDS) - ours).max() <= TOL


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-2), ("bfloat16", 1e-1), ("q8_0", 5e-2)])
def test_gguf_smaller_types_stay_close(exported, tokenizer, tmp_path, dtype, tolerance):
    """float16 / bfloat16 / q8_0 matrices (norms and router in float32): logits of size ~1 stay within
    the stated tolerance, and the file really holds that type."""
    model = exported["moe_shared"][0]
    quantize = dtype if dtype == "q8_0" else None
    export(model, tokenizer, "gguf", tmp_path, dtype="float32" if quantize else dtype, quantize=quantize)
    path = next(tmp_path.glob("*.gguf"))
    assert path.name == {"float16": "model-f16.gguf", "bfloat16": "model-bf16.gguf", "q8_0": "model-q8_0.gguf"}[dtype]
    meta, tensors, types = read_gguf(path)
    assert types["blk.0.attn_q.weight"] == {"float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == "F32"
    difference = np.abs(logits_from(meta, tensors, IDS) - logits_of(model).numpy()).max()
    assert 0 < difference <= tolerance


def test_the_rotary_permutation_is_needed(exported, tokenizer, tmp_path, monkeypatch):
    """llama.cpp's llama architecture rotates adjacent pairs: without the row permutation the file
    would still load and give plausible logits, but different ones."""
    monkeypatch.setattr("minimind.interop.gguf.interleave_rotary_rows", lambda weight, heads: weight)
    model = exported["gqa_3_1"][0]
    write_gguf(model.config, model.state_dict(), tokenizer, tmp_path / "wrong.gguf")
    assert np.abs(gguf_logits(tmp_path / "wrong.gguf", IDS) - logits_of(model).numpy()).max() > 1e-2


def test_gguf_carries_the_tokenizer_chat_template_and_modelfile(exported, tokenizer, tmp_path):
    export(exported["fixture"][0], tokenizer, "gguf", tmp_path)
    meta, _, _ = read_gguf(tmp_path / "model-f32.gguf", with_vocabulary=True)
    assert meta["general.architecture"] == "llama"
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    vocab = {token: token_id for token_id, token in enumerate(meta["tokenizer.ggml.tokens"])}
    assert vocab == tokenizer.get_vocab()
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the three special tokens are CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta["llama.context_length"], meta["llama.rope.freq_base"], meta["llama.attention.head_count_kv"]) == (512, 1e6, 2)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f32.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile


# ---------------------------------------------------------------- MiniMind-3: GGUF, Qwen3 from elsewhere, refusals

@pytest.mark.parametrize("name", ["dense3_tiny", "moe3_tiny", "m3_head_dim", "m3_moe_top1"])
def test_minimind3_gguf_reproduces_our_logits(exported3, tokenizer3, tmp_path, name):
    """MiniMind-3 as llama.cpp's qwen3 / qwen3moe (q/k norms, halves rotated, no permutation, a top-1
    router renormalised to 1): the numpy forward pass on the file gives our logits, and for the
    fixtures the original code's, within 1e-4; the Modelfile follows MiniMind-3's template."""
    model = exported3[name][0]
    message = export(model, tokenizer3, "gguf", tmp_path)
    architecture = "qwen3moe" if model.config.use_moe else "qwen3"
    assert f"architecture '{architecture}'" in message
    meta, tensors, _ = read_gguf(tmp_path / "model-f32.gguf")
    assert meta[f"{architecture}.attention.key_length"] == model.config.head_dim
    assert np.abs(logits_from(meta, tensors, IDS) - logits_of(model).numpy()).max() <= TOL
    if name in MINIMIND3_FIXTURES:
        ref = expected(MINIMIND3_CHECKPOINTS, name)
        for row, ids in enumerate(ref["input_ids"].tolist()):
            logits = logits_from(meta, tensors, ids)[:, ref["vocab_columns"].numpy()]
            assert np.abs(logits - ref["logits"][row].numpy()).max() <= TOL
    template = (tmp_path / "Modelfile").read_text()
    assert "You are a helpful assistant" not in template  # MiniMind-3 adds no default system line
    assert template.split('"""')[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_models_from_transformers_load_as_minimind3_in_every_verb(tmp_path, tokenizer3):
    """Qwen3 and Qwen3-MoE saved by transformers itself are MiniMind-3 models: a dense one with
    Qwen3's published YaRN form (factor and original length only: transformers derives the attention
    factor) and a top-1 MoE renormalising to weight 1. load_model's logits are transformers' within
    1e-4 (and the YaRN matters), the config train.py --pretrained_path reads, and the verbs run."""
    common = dict(vocab_size=6400, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=80, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024}
    models = {"qwen3": Qwen3ForCausalLM(Qwen3Config(**common, max_position_embeddings=4096, rope_parameters=yarn)),
              "qwen3_moe": Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=1,
                                                              moe_intermediate_size=32, norm_topk_prob=True))}
    torch.manual_seed(2)
    for name, qwen in models.items():
        with torch.no_grad():  # sharp attention and router, so that positions and routing show in the logits
            for key, param in qwen.named_parameters():
                param.normal_(0, 0.5 if "gate.weight" in key else 0.02) if "norm" not in key else param.uniform_(2, 4)
        qwen.eval().save_pretrained(tmp_path / name)
        tokenizer3.save_pretrained(tmp_path / name)
        ours = load_model(tmp_path / name)
        assert ours.config.model_family == "minimind3" and load_config(tmp_path / name).head_dim == 16
        with torch.no_grad():
            assert max_diff(ours(torch.tensor([IDS])).logits, qwen(torch.tensor([IDS])).logits) <= TOL, name
    plain = load_model(tmp_path / "qwen3", inference_rope_scaling=False)
    assert max_diff(logits_of(plain), logits_of(load_model(tmp_path / "qwen3"))) > 1e-3
    derived = 0.1 * np.log(4) + 1  # transformers' YaRN temperature for factor 4
    assert load_model(tmp_path / "qwen3").config.yarn_parameters["attention_factor"] == pytest.approx(derived)
    dense, moe = str(tmp_path / "qwen3"), str(tmp_path / "qwen3_moe")
    assert cli_main(["generate", "--model", dense, "--prompt", "hello", "--max_new_tokens", "3", "--temperature", "0"]) == 0
    assert cli_main(["export", "--model", dense, "--to", "qwen3", "--output_dir", str(tmp_path / "q")]) == 0
    assert cli_main(["export", "--model", moe, "--to", "gguf", "--output_dir", str(tmp_path / "g")]) == 0


@pytest.mark.parametrize("name, change_config, change_weights, message", [
    ("dense3_tiny", lambda f: f.update(attention_bias=True), None, "bias terms"),
    ("dense3_tiny", lambda f: f.update(use_sliding_window=True, sliding_window=8), None, "sliding-window attention"),
    ("dense3_tiny", lambda f: f.update(layer_types=["full_attention", "sliding_attention"]), None, "sliding-window"),
    # transformers applies YaRN at every length; MiniMind-3 only beyond the original context
    ("dense3_tiny", lambda f: f.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                        "original_max_position_embeddings": 512}), None,
     "rope type 'yarn' with these parameters"),
    ("dense3_yarn_tiny", lambda f: f["yarn_parameters"].update(factor=8), None, "rope type 'yarn'"),
    ("dense3_tiny", lambda f: f.update(tie_word_embeddings=False), untie, "differs from model.embed_tokens.weight"),
    ("moe3_tiny", lambda f: f.update(mlp_only_layers=[0]), None, "dense layers between the MoE layers"),
    ("dense3_tiny", None, lambda w: [w.pop(k) for k in list(w) if "_norm" in k and "self_attn" in k],
     "without per-head q/k norm weights"),
])
def test_qwen3_features_minimind3_lacks_are_refused(exported3, tmp_path, name, change_config, change_weights, message):
    shutil.copytree(exported3[name][1], tmp_path / "edited")
    with pytest.raises(CheckpointError, match=message):
        load_model(edited(tmp_path / "edited", change_config, change_weights))


def test_minimind3_refusals_are_one_line(exported3, tokenizer3, tmp_path, capsys):
    """--to llama (q/k norms) and --to gguf with MiniMind-3's YaRN are refused in one line, leaving
    nothing written; so are MiniMind-3 MoE routers the targets lack, and a Qwen3 directory given to
    train.py --model_family minimind2."""
    dense, yarn = (str(source_of(exported3[name][1])) for name in ("dense3_tiny", "dense3_yarn_tiny"))
    assert cli_main(["export", "--model", dense, "--to", "llama", "--output_dir", str(tmp_path / "l")]) == 2
    assert cli_main(["export", "--model", yarn, "--to", "gguf", "--output_dir", str(tmp_path / "g")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert "--to llama: this model normalises each query and key head" in errors[0]
    assert "--to gguf: llama.cpp's qwen3 graphs have no per-pair rope frequencies for the MiniMind-3 YaRN" in errors[1]
    with pytest.raises(CheckpointError, match="is a MiniMind-3 model but the config says MiniMind2"):
        load_config(exported3["dense3_tiny"][1], model_family="minimind2")
    shared = random_model(model_family="minimind3", use_moe=True, n_routed_experts=4, n_shared_experts=1)
    with pytest.raises(NotRepresentable, match="Qwen3-MoE has no shared experts"):
        export(shared, tokenizer3, "qwen3", tmp_path / "s")
    raw = random_model(model_family="minimind3", use_moe=True, n_routed_experts=4, norm_topk_prob=False)
    with pytest.raises(NotRepresentable, match="qwen3moe renormalises the top-k weights"):
        export(raw, tokenizer3, "gguf", tmp_path / "r")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- slow: the real runtimes (pytest -m slow)

MIXED_TEXT = "MiniMind 是一个小模型。It runs on a laptop: 你好, world! 3 + 4 = 7.\n<|im_start|>user\n天气怎么样?<|im_end|>"


def llama_cpp_model(path):
    """llama.cpp on a GGUF file, with a float32 key/value cache and every position's logits kept."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fixture", *SHAPES])
def test_llama_cpp_computes_our_logits_and_tokens(exported, tokenizer, tmp_path, name):
    """llama.cpp itself (llama-cpp-python) on the GGUF: the same token ids for mixed Chinese/English
    text with special tokens, logits within 1e-3, the same greedy continuation."""
    model = exported[name][0]
    export(model, tokenizer, "gguf", tmp_path)
    llm = llama_cpp_model(tmp_path / "model-f32.gguf")
    ids = llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True)
    assert ids == tokenizer(MIXED_TEXT)["input_ids"]
    llm.eval(ids)
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - logits_of(model, ids).numpy()).max() <= 1e-3
    llm.reset()
    theirs = [token for token, _ in zip(llm.generate(ids[:8], temp=0.0, top_k=1, repeat_penalty=1.0), range(12))]
    ours = torch.stack(list(decode(model, torch.tensor([ids[:8]]), max_new_tokens=12)), 1)[0].tolist()
    assert theirs == ours
    llm.close()


@pytest.mark.slow
def test_llama_cpp_runs_the_q8_0_file_close_to_ours(exported, tokenizer, tmp_path):
    """q8_0 in llama.cpp (which also rounds activations to 8 bits in its matmuls): logits of size ~2.5
    within 0.1 of ours (measured 0.064 on the fixture)."""
    model = exported["fixture"][0]
    export(model, tokenizer, "gguf", tmp_path, quantize="q8_0")
    llm = llama_cpp_model(tmp_path / "model-q8_0.gguf")
    ids = tokenizer(MIXED_TEXT)["input_ids"]
    llm.eval(ids)
    difference = np.abs(np.asarray(llm.scores[: len(ids)]) - logits_of(model, ids).numpy()).max()
    assert 1e-3 < difference <= 0.1
    llm.close()


@pytest.mark.slow
def test_lm_eval_runs_the_llama_export_on_the_bundled_task(exported, tokenizer, monkeypatch):
    """lm-eval (--model hf) on eval_tasks/, offline: its answer log-likelihoods are ours, and its
    greedy answers are what minimind's decoding produces."""
    lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval")
    from lm_eval.tasks import TaskManager

    from minimind.inference.evaluation import response_log_probs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(FIXTURES.parent.parent)  # the tasks name data/sft_eval.jsonl relative to the repository
    model, directory = exported["fixture"]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={directory},dtype=float32", tasks=["minimind_sft_answer", "minimind_sft_exact"],
        task_manager=TaskManager(include_path="eval_tasks"), limit=6, batch_size=2, device="cpu", log_samples=True)
    for sample in results["samples"]["minimind_sft_answer"]:
        prompt, answer = sample["arguments"][0]
        # lm-eval moves the context's trailing whitespace (ChatML's newline) into the continuation
        prompt, answer = prompt.rstrip(), prompt[len(prompt.rstrip()):] + answer
        context = tokenizer(prompt)["input_ids"]
        whole = tokenizer(prompt + answer)["input_ids"]
        labels = [-100] * len(context) + whole[len(context):]
        (log_prob,) = response_log_probs(model, [{"input_ids": torch.tensor(whole), "labels": torch.tensor(labels)}])
        assert float(sample["resps"][0][0][0]) == pytest.approx(log_prob, abs=1e-3)
    for sample in results["samples"]["minimind_sft_exact"]:
        prompt = tokenizer(sample["arguments"][0][0])["input_ids"]
        ours = torch.stack(list(decode(model, torch.tensor([prompt]), max_new_tokens=64, eos_token_id=[0, 2])), 1)[0]
        text = tokenizer.decode([t for t in ours.tolist() if t not in (0, 2)])
        assert sample["resps"][0][0] == text


@pytest.mark.slow
def test_llama_cpp_python_chats_with_the_embedded_template(exported, tokenizer, tmp_path):
    """llama-cpp-python picks the chat template from the GGUF and renders our prompt exactly."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    export(exported["fixture"][0], tokenizer, "gguf", tmp_path)
    llm = llama_cpp_model(tmp_path / "model-f32.gguf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is 3+4?"}]
    assert llm.chat_format == "chat_template.default"
    rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")(messages=messages).prompt
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = llm.create_chat_completion(messages, max_tokens=4, temperature=0)["choices"][0]
    assert reply["message"]["role"] == "assistant" and reply["finish_reason"] in ("length", "stop")
    llm.close()
