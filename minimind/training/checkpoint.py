"""Training checkpoints: everything a run needs to continue exactly where it stopped (model or
adapter weights, optimizer, scheduler, every random generator, progress, the run's flags).

Read back with `weights_only=True`: tensors, numbers, tuples and dicts, never pickled code.
"""
import random

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_write


def rng_state(device):
    """Every random generator a run draws from, as tensors and numbers (weights_only loads it): the
    CPU's, Python's, NumPy's and the training device's own (CUDA or MPS; only that GPU's, so that a
    resume may see fewer GPUs)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Put back what rng_state saved; a device generator only onto the same kind of device."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    saved = state.get(device.type) if device.type in ("cuda", "mps") else None
    if isinstance(saved, list):  # an older checkpoint: every visible GPU's state, this process's at its index
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = saved[index] if index < len(saved) else None
    if saved is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved, device)
    else:
        torch.mps.set_rng_state(saved)


def save_training_state(path, state):
    """A resumable checkpoint (model or adapter weights, optimizer, scheduler, RNG, progress, the
    run's flags), written atomically: a crash mid-write leaves the previous one intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path):
    try:
        # Optimizer state and RNG states are tensors, numbers, tuples and dicts: weights_only suffices.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}); "
                              f"delete it to start over, or restore a backup") from None
