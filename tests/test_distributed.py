"""torchrun data parallel training on CPU (gloo): two ranks give what one process gives with the same
global batch, one rank writes, and a killed run resumes exactly, with the same or another number of ranks."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.torchrun  # half a minute to two minutes each: run with -m torchrun (.ci/run does)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
COMMON = ["--hidden_size", "32", "--num_layers", "2", "--num_heads", "4", "--max_seq_len", "64", "--device", "cpu",
          "--report_to", "none", "--sample_tokens", "0", "--dropout", "0", "--log_interval", "1",
          "--learning_rate", "2e-3"]
SFT = COMMON + ["--data", str(DATA / "sft_eval.jsonl"), "--max_steps", "4"]
DPO = COMMON + ["--data", str(DATA / "dpo_eval.jsonl"), "--max_steps", "3", "--lora_rank", "4"]


@pytest.fixture
def environment(tmp_path):
    # one thread per rank; float sums are ordered per thread, so exact comparisons need a fixed count
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MINIMIND_CACHE": str(tmp_path / "cache")}


def train(args, environment, ranks=1, wait=True, torchrun=None, timeout=600):
    """train.py ARGS: under torchrun with `ranks` processes (by default when ranks > 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launcher if (ranks > 1 if torchrun is None else torchrun) else [sys.executable]) + [
        str(ROOT / "train.py")] + args
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def weights(output_dir):
    return torch.load(Path(output_dir) / "model_final.pth", weights_only=True)


def assert_close(a, b, rel=1e-5):
    """Every tensor within `rel` relative error: ||a - b|| / ||b||. (Adam turns float-rounding noise in
    near-zero gradients into updates of up to ~1e-6 on single weights, so an element-wise bound would
    measure rounding, not training.)"""
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).float().norm() / b[k].float().norm().clamp(min=1e-12)).item() for k in a)
    assert worst <= rel, worst


@pytest.mark.parametrize("flags, two_ranks, one_process", [
    (SFT, ["--batch_size", "2", "--accumulation_steps", "2"], ["--batch_size", "4", "--accumulation_steps", "2"]),
    (SFT, ["--batch_size", "4", "--fsdp"], ["--batch_size", "8"]),
    (DPO, ["--batch_size", "2"], ["--batch_size", "4"]),
    (SFT + ["--lora_rank", "4"], ["--batch_size", "2", "--fsdp"], ["--batch_size", "4"]),
], ids=["sft-ddp-accumulation", "sft-fsdp", "dpo-lora-ddp", "sft-lora-fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path, environment, flags, two_ranks,
                                                                       one_process):
    two = train(flags + two_ranks + ["--output_dir", str(tmp_path / "two")], environment, ranks=2)
    assert "Ranks: 2 (" in two and "gloo); global batch" in two
    assert ("FSDP (sharded" in two) == ("--fsdp" in two_ranks)
    assert two.count("MiniMind training configuration:") == 1  # one writer: one banner, one log
    assert two.count("Device: cpu") == 1 and "CUDA" not in two  # no notice per rank
    train(flags + one_process + ["--output_dir", str(tmp_path / "one")], environment)
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    steps = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == len(set(steps)) == int(flags[flags.index("--max_steps") + 1])
    if "--lora_rank" in flags:  # the adapters are saved too, as one process saves them
        assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()


def test_every_rank_refuses_a_folder_that_holds_a_run_and_rank_0_says_it_once(tmp_path, environment):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"an earlier run")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(launcher + [str(ROOT / "train.py")] + SFT + ["--output_dir", str(out)], capture_output=True,
                            text=True, env=environment, timeout=300)
    assert result.returncode != 0
    said = [line for line in (result.stdout + result.stderr).splitlines() if "holds an earlier run" in line]
    assert said == [f"error: {out} holds an earlier run (checkpoint.pt, final/): add --resume to continue it, "
                    f"--overwrite to delete it and start over, or choose another --output_dir"]
    assert (out / "checkpoint.pt").read_bytes() == b"an earlier run"


def children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return found


def test_a_killed_rank_stops_the_job_and_resume_continues_with_any_rank_count(tmp_path, environment):
    flags = COMMON + ["--data", str(DATA / "sft_eval.jsonl"), "--max_steps", "8", "--save_steps", "2",
                      "--batch_size", "2", "--accumulation_steps", "2"]
    train(flags + ["--output_dir", str(tmp_path / "whole")], environment, ranks=2)
    process = train(flags + ["--output_dir", str(tmp_path / "cut")], environment, ranks=2, wait=False)
    for line in process.stdout:
        if "Step [5/" in line:  # checkpoints at steps 2 and 4 are written
            workers = children(process.pid)
            os.kill(max(workers), signal.SIGKILL)  # one rank dies
            break
    process.stdout.read()
    process.wait(timeout=300)
    assert process.returncode != 0
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["progress"]["global_step"] == 4
    subprocess.run(["cp", "-r", str(tmp_path / "cut"), str(tmp_path / "cut_one")], check=True)
    train(flags + ["--output_dir", str(tmp_path / "cut"), "--resume"], environment, ranks=2)
    assert_close(weights(tmp_path / "cut"), weights(tmp_path / "whole"))
    # the same global batch (2 x 2 ranks x 2) on one process: 4 x 1 x 2
    train(flags + ["--batch_size", "4", "--output_dir", str(tmp_path / "cut_one"), "--resume"], environment)
    assert_close(weights(tmp_path / "cut_one"), weights(tmp_path / "whole"))
    # another global batch is refused in one line
    result = subprocess.run([sys.executable, str(ROOT / "train.py")] + flags
                            + ["--output_dir", str(tmp_path / "cut_one"), "--resume", "--max_steps", "9"],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 2 and "global batch" in result.stderr and "8 (4 x 1 x 2) -> 4 (2 x 1 x 2)" in result.stderr


def test_distillation_on_two_ranks_trains_like_one_process(tmp_path, environment):
    from tests.test_distill import save_teacher
    teacher = save_teacher(tmp_path / "teacher")
    flags = SFT + ["--stage", "distill", "--teacher", str(teacher), "--distill_temperature", "2"]
    train(flags + ["--batch_size", "2", "--output_dir", str(tmp_path / "two")], environment, ranks=2)
    train(flags + ["--batch_size", "4", "--output_dir", str(tmp_path / "one")], environment)
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_grpo_on_two_ranks_samples_scores_and_steps(tmp_path, environment, sharding):
    """Each rank samples answers to its own prompts (so the samples, unlike a deterministic stage's
    batches, differ from one process's); the run steps, logs the rewards once and changes the weights.
    Sharded, each rank decodes every step (its answers may end sooner than the other's)."""
    from tests.test_grpo import REWARDS, prompts_file, saved_base
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS)
    base = saved_base(tmp_path)
    args = [arg for arg in COMMON if arg not in ("--hidden_size", "32", "--num_layers", "2", "--num_heads", "4")]
    args += ["--stage", "grpo", "--data", str(prompts_file(tmp_path)), "--pretrained_path", str(base),
             "--reward", f"{rewards}:by_length", "--grpo_group_size", "4", "--grpo_max_new_tokens", "6",
             "--batch_size", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "two")] + sharding
    out = train(args, environment, ranks=2, timeout=300)
    assert out.count("MiniMind training configuration:") == 1
    steps = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in steps if "reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    from safetensors.torch import load_file
    start = load_file(base / "model.safetensors")
    trained = weights(tmp_path / "two")
    assert any(not torch.equal(trained[name], start[name]) for name in trained if name in start)


def validation_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]


def test_fsdp_validates_a_batch_with_fewer_samples_than_ranks(tmp_path, environment):
    """Validation batches of 2 and 1 samples on two ranks: the rank without a share of the second
    still runs a forward (counted as nothing), since every FSDP forward gathers from all the ranks
    (without it, the ranks' collectives stopped matching)."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join((DATA / "sft_train.jsonl").read_text().splitlines(keepends=True)[:3]))
    flags = SFT + ["--eval_data", str(held_out), "--max_steps", "2", "--batch_size", "2", "--fsdp",
                   "--output_dir", str(tmp_path)]
    train(flags, environment, ranks=2, timeout=180)
    rows = validation_rows(tmp_path)
    assert [row["step"] for row in rows] == [0, 2] and all(0 < row["val_loss"] < 20 for row in rows)


def test_torchrun_with_one_process_runs_the_distributed_path(tmp_path, environment):
    """One process under torchrun joins a process group and trains through the same wrapper as N
    (what a machine with one GPU can check of NCCL and FSDP; DDP's wrapper: the group-of-one test)."""
    out = train(SFT + ["--fsdp", "--output_dir", str(tmp_path)], environment, torchrun=True)
    assert "Ranks: 1 (FSDP (sharded" in out and "gloo); global batch" in out


@pytest.fixture
def group_of_one(monkeypatch):
    """World.start under torchrun's variables, in this process: a process group of one (gloo)."""
    import socket

    from minimind.training.distributed import World
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(name, value)
    world, device = World.start(torch.device("cpu"))
    yield world, device
    world.close()


def tiny_model():
    from minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2))


def test_a_group_of_one_wraps_the_model_without_broadcasting_its_buffers(group_of_one):
    """A group of one joins and sums, and wraps the model in DDP with buffer broadcasts off (the
    RoPE tables are the same on every rank)."""
    world, device = group_of_one
    assert world.distributed and world.world_size == 1
    assert world.sum([1.5, 2], device) == [1.5, 2.0]
    wrapped = world.wrap(tiny_model())
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    assert not wrapped.will_sync_module_buffers()


def test_a_sharded_model_decodes_gathered_and_is_sharded_again(group_of_one):
    """Under FSDP every rank gathers the whole model once for a decode (GRPO's ranks sample together)
    and then decodes alone, so the ranks' answers may end at different steps without a collective
    left waiting; the tokens are the plain model's, and the weights are sharded again after."""
    from torch.distributed.tensor import DTensor

    from minimind.inference.decoding import generate
    world, _ = group_of_one
    plain, model = tiny_model().eval(), world.wrap(tiny_model(), fsdp=True)
    prompts = [[5, 6, 7], [8, 9]]
    assert generate(model, prompts, max_new_tokens=5, eos_token_id=[]).token_ids == \
        generate(plain, prompts, max_new_tokens=5, eos_token_id=[]).token_ids
    every_token = list(range(plain.config.vocab_size))  # whatever comes first is an eos
    assert generate(model, prompts, max_new_tokens=6, eos_token_id=every_token).finish_reasons == ["eos", "eos"]
    assert all(isinstance(parameter, DTensor) for parameter in model.parameters())


def test_moe_trains_on_two_ranks_when_an_expert_gets_no_token(tmp_path, environment):
    """Windows of 4 tokens, one per rank: 3 tokens choose 2 of 4 experts each, so some step leaves an
    expert without a token on some rank; DistributedDataParallel still finishes every reduction."""
    flags = COMMON + ["--use_moe", "--max_seq_len", "4", "--batch_size", "1", "--max_steps", "6",
                      "--val_fraction", "0", "--data", str(DATA / "pretrain.jsonl"), "--output_dir", str(tmp_path)]
    train(flags, environment, ranks=2, timeout=300)
    assert len([line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 6
