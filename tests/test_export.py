"""Export to stock transformers layouts and GGUF, and reading them back.

Checked against: transformers alone in a fresh process (logits, greedy tokens, chat template),
the GGUF file read back and run with numpy as llama.cpp runs it (gguf_reference.py), the
original MiniMind-3 numbers for the Qwen3 path, and bit-exact round trips. The llama.cpp check
itself (llama-cpp-python, built from source) and lm-eval are slow tests: pytest -m slow.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from minimind import MiniMindConfig, MiniMindForCausalLM, load_model
from minimind.checkpoint import load_config
from minimind.cli import main as cli_main
from minimind.errors import CheckpointError
from minimind.export import export, write_stock_weights
from minimind.gguf_export import write_gguf
from minimind.generation import decode
from minimind.stock_layouts import NotRepresentable
from minimind.tokenizer import load_tokenizer

from .conftest import FIXTURES, MINIMIND2_TOKENIZER, MINIMIND3_TOKENIZER
from .gguf_reference import gguf_logits, logits_from, read_gguf
from .test_model import at_columns, expected, fixture_model, max_diff

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
IDS = [1, 20, 300, 4000, 5, 6, 7, 8, 9, 10, 2000, 3000, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
       57, 58, 59, 60, 61, 62, 63, 64]


def random_model(seed=0, **shape):
    """A tiny model with random norms, a sharp router and sharp attention (q and k scaled up, so that
    positions, hence the rotary layout and YaRN, visibly change the logits)."""
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=6400,
                  max_position_embeddings=512, intermediate_size=96)
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**{**fields, **shape})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
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


# ---------------------------------------------------------------- transformers alone

FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)  # tiny models; as conftest.one_thread, for a busy 2-core machine
    directories, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    results = {}
    for name, directory in directories.items():
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            greedy = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好, hello"}], tokenize=False,
                                             add_generation_prompt=True)
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        results[name] = dict(logits=logits, greedy=greedy[0, 8:], chat=chat, tied=tied, cls=type(model).__name__,
                             eos=model.generation_config.eos_token_id)
    assert "minimind" not in sys.modules, "the export must not need minimind"
    torch.save(results, out)
""")


def test_transformers_alone_reproduces_logits_and_greedy_tokens(exported, tokenizer, tmp_path):
    """A fresh process with transformers only (no import minimind, no trust_remote_code) opens every
    export: logits within 1e-4 in float32, the same greedy tokens, the chat template, tied weights."""
    directories = {name: str(directory) for name, (_, directory) in exported.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(directories), json.dumps(IDS), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    ours_chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好, hello"}], tokenize=False,
                                              add_generation_prompt=True)
    for name, (model, _) in exported.items():
        result = results[name]
        assert max_diff(result["logits"], logits_of(model)) <= TOL, name
        tokens = torch.stack(list(decode(model, torch.tensor([IDS[:8]]), max_new_tokens=12)), 1)[0]
        assert torch.equal(result["greedy"], tokens), name
        assert result["tied"] and result["chat"] == ours_chat and result["eos"] == [0, 2], name
        expected_class = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                          "granitemoeshared": "GraniteMoeSharedForCausalLM"}[LAYOUT_OF.get(name, "llama")]
        assert result["cls"] == expected_class, name


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


def stock_directory(tmp_path, change_config=None, change_weights=None, **shape):
    """A --to llama export of a tiny model, with its config.json or weights edited."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "edited"
    export(random_model(**shape), load_tokenizer(MINIMIND2_TOKENIZER), "llama", directory)
    fields = json.loads((directory / "config.json").read_text())
    (change_config or (lambda f: None))(fields)
    (directory / "config.json").write_text(json.dumps(fields))
    weights = load_file(directory / "model.safetensors")
    (change_weights or (lambda w: None))(weights)
    save_file(weights, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(attention_bias=True), "bias terms"),
    (lambda f: f.update(head_dim=32), "head_dim 32"),
    (lambda f: f.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, rope_scaling=None),
     "rope type 'llama3'"),
    (lambda f: f.update(model_type="qwen3"), "per-head q/k RMSNorm"),
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
    def untie(weights):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1

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
    monkeypatch.setattr("minimind.gguf_export.interleave_rotary_rows", lambda weight, heads: weight)
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


# ---------------------------------------------------------------- the Qwen3 path (per-head q/k norms)

@pytest.mark.parametrize("name", ["dense3_tiny", "moe3_tiny"])
def test_minimind3_weights_in_qwen3_layouts_match_the_original(tmp_path, name):
    """MiniMind-3 weights (q/k norms) written as Qwen3 / Qwen3-MoE and as a GGUF qwen3/qwen3moe:
    the logits the original MiniMind-3 code computed."""
    fields = json.loads((FIXTURES / "minimind3" / f"{name}_config.json").read_text())
    config = MiniMindConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=6400,
        intermediate_size=fields["moe_intermediate_size" if fields["use_moe"] else "intermediate_size"],
        rms_norm_eps=fields["rms_norm_eps"], max_position_embeddings=512, use_moe=fields["use_moe"],
        n_routed_experts=fields["num_experts"], num_experts_per_tok=fields["num_experts_per_tok"], n_shared_experts=0)
    state = {k: v.float() for k, v in torch.load(FIXTURES / "minimind3" / f"{name}_fp16.pth", weights_only=True).items()}
    ref = expected(FIXTURES / "minimind3", name)
    layout = write_stock_weights(config, state, "qwen3", tmp_path)
    assert layout.model_type == ("qwen3_moe" if fields["use_moe"] else "qwen3")
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(at_columns(qwen(ref["input_ids"]).logits, ref), ref["logits"]) <= TOL
    write_gguf(config, state, load_tokenizer(MINIMIND3_TOKENIZER), tmp_path / "m.gguf")
    logits = gguf_logits(tmp_path / "m.gguf", ref["input_ids"][0].tolist())[:, ref["vocab_columns"].numpy()]
    assert np.abs(logits - ref["logits"][0].numpy()).max() <= TOL
    with pytest.raises(NotRepresentable, match="use --to qwen3"):
        write_stock_weights(config, state, "llama", tmp_path / "llama")


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

    from minimind.evaluation import sequence_losses

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
        (loss,), _ = sequence_losses(model, [whole], [[-100] * len(context) + whole[len(context):]])
        assert float(sample["resps"][0][0][0]) == pytest.approx(-loss, abs=1e-3)
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
