"""Where a model runs: one policy for training and inference, and what a device can tell.

`--device auto` (the default of every verb) takes the first of a CUDA GPU, Apple's MPS and the CPU
that this machine has. A named device (cpu, cuda, cuda:1, mps) must exist: asking for one that is
absent stops the command in one line, before any loading, rather than running somewhere else.
Below: whether a GPU computes in bfloat16, waiting for its work, its memory.
"""
from dataclasses import dataclass

import torch

from .errors import UserError

AUTO = "auto"


def mps_available():
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(name):
    """A torch.device for a --device value (see the module docstring)."""
    if name == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    if device.type == "mps" and not mps_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    return device


def native_bfloat16(device):
    """Whether `device` computes in bfloat16 itself: CUDA GPUs of compute capability 8.0 (Ampere) on.
    (torch.cuda.is_bf16_supported() also says yes on a T4 or V100, which emulate it slowly and without
    flash attention, and it asks the current GPU rather than this one.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


# ---------------------------------------------------------------- a device's work and memory

def synchronize(device):
    """Wait until the device has run everything queued: GPU work is timed only after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_cache(device):
    """Hand the allocator's cached blocks back to the GPU (after an out-of-memory error, a phase)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def is_out_of_memory(error):
    """CUDA raises torch.OutOfMemoryError; MPS a RuntimeError that says so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


MIB = 2 ** 20


@dataclass
class GpuMemory:
    """The most a process held on a CUDA GPU since its peaks were last reset, MiB: its tensors, what
    PyTorch's allocator reserved for them (the tensors and the blocks it keeps cached), and what
    the GPU holds beside that (the CUDA context, libraries' workspaces, other processes), against
    the GPU's capacity. A process needs `total`; max_memory_allocated alone (`tensors`) undercounts
    it by the allocator's reserve and the context, some hundreds of MiB."""
    tensors: float
    reserved: float
    overhead: float
    capacity: float

    @classmethod
    def measure(cls, device):
        free, capacity = torch.cuda.mem_get_info(device)
        overhead = capacity - free - torch.cuda.memory_reserved(device)
        return cls(torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB,
                   overhead / MIB, capacity / MIB)

    @property
    def total(self):
        return self.reserved + self.overhead

    def describe(self):
        return (f"{self.total:.0f} MiB of GPU memory ({self.tensors:.0f} MiB of tensors at most, {self.reserved:.0f} "
                f"reserved by PyTorch, {self.overhead:.0f} of CUDA context and other processes; the GPU has "
                f"{self.capacity:.0f} MiB)")
