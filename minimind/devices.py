"""Where a model runs: one policy for training and inference.

`--device auto` (the default of every verb) takes the first of a CUDA GPU, Apple's MPS and the CPU
that this machine has. A named device (cpu, cuda, cuda:1, mps) must exist: asking for one that is
absent stops the command in one line, before any loading, rather than running somewhere else.
"""
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
