from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
SEED_CHECKPOINTS = FIXTURES / "seed_checkpoints"
MINIMIND2_TOKENIZER = FIXTURES / "minimind2_tokenizer"


@pytest.fixture(scope="session")
def seed_checkpoints():
    if not SEED_CHECKPOINTS.exists():
        pytest.fail(f"fixtures not found at {SEED_CHECKPOINTS}: the repository expects ../shared beside it")
    return SEED_CHECKPOINTS
