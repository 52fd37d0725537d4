"""--backend llama.cpp: the decoder's two passes computed by llama.cpp on a GGUF export give the torch
decoder's logits and greedy tokens, alone, batched, chunked, in the server's engine and on the
command line. Those tests need llama-cpp-python (marked slow: `.ci/run` runs them when it is
installed); the error without it does not."""
import sys

import pytest
import torch

from minimind.commands.main import main as cli_main
from minimind.data.tokenizer import load_tokenizer
from minimind.inference.decoding import generate, right_pad
from minimind.inference.prepared import prepare
from minimind.inference.serving.engine import BatchingEngine
from minimind.inference.settings import SamplingSettings
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM

from .conftest import memorize

needs_llama_cpp = pytest.mark.slow


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=512)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model that has memorised a few sentences: its greedy continuations are far from ties."""
    texts = ["Velwen is a quiet river town in the north of the valley.", "3 and 4 make 7, and 7 and 5 make 12.",
             "Mira lives in Velwen and works as a gardener by the river."]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, ids))
    model = tiny_model()
    memorize(model, torch.tensor([row + [0] * (width - len(row)) for row in ids]), steps=120)
    return model.eval(), ids


@pytest.fixture(scope="module")
def backend(trained, tokenizer):
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")
    from minimind.inference.llama_cpp_backend import LlamaCppModel

    decoder = LlamaCppModel(trained[0], tokenizer)
    yield decoder
    decoder.close()


@needs_llama_cpp
def test_prefill_and_step_logits_are_the_torch_decoders(trained, backend):
    model, _ = trained
    torch.manual_seed(5)
    prompts = [torch.randint(3, 6400, (n,)) for n in (7, 3, 12)]
    logits = {}
    for name, decoder in (("torch", prepare(model)), ("llama.cpp", backend)):
        cache = decoder.new_cache(3, 64)
        first = decoder.prefill(cache, [0, 1, 2], right_pad(prompts), lengths=[7, 3, 12])
        second = decoder.step(cache, torch.tensor([5, 6, 7]))
        third = decoder.step(cache, torch.tensor([8, 9, 10]), active=[True, False, True])
        logits[name] = (first, second, third[[0, 2]])
        assert cache.lengths == [9, 4, 14]
    for ours, theirs in zip(logits["torch"], logits["llama.cpp"]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 5e-3 * ours.abs().max(), (ours - theirs).abs().max()


@needs_llama_cpp
def test_greedy_tokens_equal_the_torch_decoder_alone_batched_and_shared(trained, backend, tokenizer):
    model, ids = trained
    prompts = [row[:5] for row in ids] + [ids[0][:5]]  # the last shares its prompt with the first (copy_rows)
    expected = generate(model, prompts, max_new_tokens=10, eos_token_id=[]).token_ids
    assert generate(backend, prompts, max_new_tokens=10, eos_token_id=[]).token_ids == expected
    for prompt, tokens in zip(prompts, expected):
        assert generate(backend, [prompt], max_new_tokens=10, eos_token_id=[]).token_ids[0] == tokens
    assert tokenizer.decode(expected[0]).endswith("river town in the north of the valley.")


@needs_llama_cpp
def test_rows_beyond_the_pool_share_it_and_decode_the_same(trained, backend, monkeypatch):
    from minimind.inference import llama_cpp_backend

    assert llama_cpp_backend.choose_layout(4, 100) == (False, 1024, 256)  # each row a stream of its own
    assert llama_cpp_backend.choose_layout(16, 32768) == (True, 32768, 32768)  # the server's rows, a long context
    model, ids = trained
    prompts = [row[:5] for row in ids] + [ids[0][:5]]
    expected = generate(model, prompts, max_new_tokens=10, eos_token_id=[]).token_ids
    monkeypatch.setattr(llama_cpp_backend, "POOL_TOKENS", 256)  # 4 rows of up to 15 tokens no longer fit apart
    assert generate(backend, prompts, max_new_tokens=10, eos_token_id=[]).token_ids == expected
    assert backend.shared and backend.cells == 256
    monkeypatch.undo()
    assert generate(backend, prompts, max_new_tokens=10, eos_token_id=[]).token_ids == expected
    assert not backend.shared


@needs_llama_cpp
def test_a_prompt_read_in_chunks_gives_the_logits_of_one_pass(trained, backend):
    prompt = torch.tensor([trained[1][2]])
    cache = backend.new_cache(1, 64)
    whole = backend.prefill(cache, [0], prompt)
    cache = backend.new_cache(1, 64)
    backend.prefill(cache, [0], prompt[:, :4])
    backend.prefill(cache, [0], prompt[:, 4:9], start=4)
    chunked = backend.prefill(cache, [0], prompt[:, 9:], start=9)
    assert (whole - chunked).abs().max() <= 5e-3 * whole.abs().max() and cache.lengths == [prompt.shape[1]]


@needs_llama_cpp
def test_the_servers_engine_decodes_each_request_as_torch_does_alone(trained, backend, tokenizer):
    model, ids = trained
    engine = BatchingEngine(backend, tokenizer, max_batch_size=2, max_queue=8, context_length=64, prefill_chunk=16)
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    prompts = [row[:6] for row in ids] + [ids[1][:3]]
    jobs = []
    for prompt in prompts:  # three requests for two rows: the third takes a row another gave back
        jobs.append(engine.submit(prompt, settings, lambda update: None))
        engine.step()
    while engine.running or engine.waiting:
        engine.step()
    for prompt, job in zip(prompts, jobs):
        assert job.token_ids == generate(model, [prompt], max_new_tokens=8, tokenizer=tokenizer).token_ids[0]
    assert engine.stats["largest_batch"] == 2


@needs_llama_cpp
def test_a_sequence_beyond_the_row_limit_is_refused(backend):
    cache = backend.new_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit a sequence of at most 8"):
        backend.prefill(cache, [0], torch.arange(3, 12)[None])


@needs_llama_cpp
def test_generate_on_the_command_line_says_the_same_with_either_backend(trained, tokenizer, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")
    folder = tmp_path / "model"
    trained[0].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    replies = {}
    for backend_name in ("torch", "llama.cpp"):
        assert cli_main(["generate", "--model", str(folder), "--prompt", "Velwen is", "--temperature", "0",
                         "--max_new_tokens", "8", "--backend", backend_name]) == 0
        replies[backend_name] = capsys.readouterr().out
    assert replies["torch"] == replies["llama.cpp"] and replies["torch"].startswith("Velwen is a quiet")


def test_without_llama_cpp_the_backend_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails, installed or not
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    assert cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--backend", "llama.cpp"]) == 2
    error = capsys.readouterr().err
    assert "--backend llama.cpp needs llama-cpp-python" in error and "[ecosystem]" in error


def test_the_llama_cpp_backend_refuses_a_gpu(tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="the device is checked once llama_cpp imports")
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    assert cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--backend", "llama.cpp",
                     "--device", "cuda"]) == 2
    assert "runs the model on the CPU" in capsys.readouterr().err
