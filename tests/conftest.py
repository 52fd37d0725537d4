from pathlib import Path

import pytest
import torch

# Trimmed copies of the original MiniMind fixtures; tests/fixtures/README.md says where each came from.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED_CHECKPOINTS = FIXTURES / "minimind2"
MINIMIND3_CHECKPOINTS = FIXTURES / "minimind3"
MINIMIND2_TOKENIZER = FIXTURES / "minimind2_tokenizer"
MINIMIND3_TOKENIZER = FIXTURES / "minimind3_tokenizer"


@pytest.fixture(scope="session")
def seed_checkpoints():
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
