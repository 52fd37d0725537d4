"""pyproject.toml asks for what the code uses: its torch floor is no lower than the first release
that has every torch feature the library calls (an older torch would install and then fail)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# text in the library's source -> the first torch release where that call works
TORCH_FEATURES = {
    "enable_gqa=": ((2, 5), "scaled_dot_product_attention(enable_gqa=): every forward"),
    "fully_shard": ((2, 6), "FSDP2's public torch.distributed.fsdp.fully_shard: --fsdp"),
    '"mps"': ((2, 7), "attention with fewer key/value heads than query heads on Apple GPUs (MPS)"),
}


def torch_floor():
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert found, "pyproject.toml names no torch>=X.Y floor"
    return int(found.group(1)), int(found.group(2))


def test_the_torch_floor_covers_every_feature_the_code_calls():
    source = "\n".join(path.read_text() for path in (ROOT / "minimind").rglob("*.py"))
    used = {text: needs for text, needs in TORCH_FEATURES.items() if text in source}
    assert "enable_gqa=" in used  # the table still describes this code
    floor = torch_floor()
    too_old = [f"{why} needs torch {'.'.join(map(str, version))}" for version, why in used.values() if floor < version]
    assert not too_old, f"pyproject.toml says torch>={floor[0]}.{floor[1]}, but " + "; ".join(too_old)
