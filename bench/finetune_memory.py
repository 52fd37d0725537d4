"""Memory of a fine-tuning step: full training against LoRA, at the SFT shape of the bundled data.

    python bench/finetune_memory.py                 # default 26M shape, batch 16 x 256, a few minutes
    python bench/finetune_memory.py --lora_rank 8 --batch_size 8

Each variant runs in a fresh process (so the two do not share freed memory): load the model,
build the optimizer, then two training steps with the chunked loss and fused AdamW (as train.py
does). Reported: how much the peak resident memory (VmHWM) rose above the loaded model during the
steps, and the median step time of two more steps.

The resident memory of a training step depends on the C allocator as much as on the tensors,
because the allocator keeps freed memory for reuse and how much it keeps depends on the order of
allocations, not only on how much is live at once. Three settings:
  glibc         what the operating system sees with glibc's default malloc;
  jemalloc      LD_PRELOAD=libjemalloc.so.2 with MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
                (it keeps freed pages too, but sorted by size); only when the library is installed
                (Debian/Ubuntu: apt install libjemalloc2);
  exact         glibc with MALLOC_MMAP_THRESHOLD_=65536, so every tensor above 64 KiB is its own
                mapping, returned on free: the peak then tracks the tensors live at once (slow).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def child(args):
    import torch

    from minimind.model.config import MiniMindConfig
    from minimind.model.model import MiniMindForCausalLM
    from minimind.training.config import LoRASettings
    from minimind.training.run_log import process_memory_mib

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers))
    if args.variant != "full":
        from minimind.model.lora import add_lora
        model = add_lora(model, LoRASettings(lora_rank=args.lora_rank, lora_targets=LORA_TARGETS,
                                             lora_special_tokens=args.variant == "lora+tokens"))
    core = model.get_base_model() if args.variant != "full" else model
    core.model.gradient_checkpointing = bool(args.gradient_checkpointing)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len))

    def step():
        out = model(ids, labels=ids, return_logits=False)  # the chunked loss, as train.py
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = process_memory_mib("VmRSS")
    if before is None:
        raise RuntimeError("this benchmark reads /proc/self/status: it needs Linux")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    step()
    added = process_memory_mib("VmHWM") - before
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    share = sum(p.numel() for p in trainable) / sum(p.numel() for p in model.parameters())
    print(f"{added:.0f} {statistics.median(times):.2f} {share:.4f}")


JEMALLOC_PATHS = ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2"]


def allocators():
    settings = {"glibc": {}}
    jemalloc = next((path for path in JEMALLOC_PATHS if Path(path).exists()), None)
    if jemalloc:
        settings["jemalloc"] = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    settings["exact"] = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    return settings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", type=int, default=0, choices=[0, 1],
                        help="recompute each block in backward instead of keeping its activations")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    settings = allocators()
    print(f"hidden {args.hidden_size}, {args.num_hidden_layers} layers, batch {args.batch_size} x {args.seq_len}, "
          f"float32, {args.threads} thread(s), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"LoRA rank {args.lora_rank} on {LORA_TARGETS}")
    if "jemalloc" not in settings:
        print("(no libjemalloc.so.2 found: that column is skipped)")
    header = "".join(f"{name + ' MiB':>14s}" for name in settings)
    timed = [name for name in settings if name != "exact"]
    print(f"{'':12s} {'trainable':>9s}{header}" + "".join(f"{name + ' step s':>16s}" for name in timed))
    peaks = {}
    for variant in ("full", "lora", "lora+tokens"):
        results = {}
        for name, extra_env in settings.items():
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                                 env={**os.environ, **extra_env}, check=True, capture_output=True, text=True).stdout.split()
            results[name] = [float(x) for x in out]
        peaks[variant] = {name: r[0] for name, r in results.items()}
        share = results["glibc"][2]
        print(f"{variant:12s} {share:9.1%}" + "".join(f"{r[0]:14.0f}" for r in results.values())
              + "".join(f"{results[name][1]:16.2f}" for name in timed))
    for name in settings:
        print(f"peak, LoRA / full, {name}: {peaks['lora'][name] / peaks['full'][name]:.2f}")


if __name__ == "__main__":
    main()
