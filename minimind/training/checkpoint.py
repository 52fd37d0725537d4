"""Training checkpoints: everything a run needs to continue exactly where it stopped (model or
adapter weights, optimizer, scheduler, every random generator, progress, the run's flags).

Read back with `weights_only=True`: tensors, numbers, tuples and dicts, never pickled code.
"""
import random

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_write


def rng_state():
    """Every random generator a run draws from, as tensors and numbers (weights_only loads it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
