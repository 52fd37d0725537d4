from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
SEED_CHECKPOINTS = FIXTURES / "seed_checkpoints"
MINIMIND2_TOKENIZER = FIXTURES / "minimind2_tokenizer"


@pytest.fixture(scope="session")
def seed_checkpoints():
    if not SEED_CHECKPOINTS.exists():
        pytest.fail(f"fixtures not found at {SEED_CHECKPOINTS}: the repository expects ../shared beside it")
    return SEED_CHECKPOINTS


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memorize(model, input_ids, steps, lr=3e-3):
    """Train `model` on one sequence until it reproduces it; returns the last loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss
