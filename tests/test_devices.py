"""One device policy for training and inference (minimind/devices.py)."""
import pytest
import torch

from minimind.commands.main import main as cli_main
from minimind.devices import resolve_device
from minimind.errors import UserError


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only policy")
def test_auto_is_the_cpu_here_and_an_absent_device_is_an_error(capsys, tmp_path):
    assert resolve_device("auto") == torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda:0: CUDA is not available on this machine; use --device auto"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="--device gpu0: not a device name"):
        resolve_device("gpu0")
    # the same answer from training and from inference, before any model or data is read (they exist:
    # a missing file is reported before torch loads, commands/inputs.py)
    (tmp_path / "notes.txt").write_text("a line\n")
    for argv in (["train", "--device", "cuda", "--data", str(tmp_path / "notes.txt"), "--output_dir", str(tmp_path)],
                 ["generate", "--device", "cuda", "--model", str(tmp_path), "--prompt", "x"]):
        assert cli_main(argv) == 2
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_dtype_auto_asks_the_training_gpu_whether_it_has_bfloat16_units(monkeypatch):
    """auto: bfloat16 from compute capability 8.0 (Ampere), float16 below it (a T4 or V100 only
    emulates bfloat16), and the capability of the GPU that trains, not of the current one."""
    from minimind.training.trainer import resolve_dtype
    asked = []

    def capability(device):
        asked.append(device)
        return {0: (8, 0), 1: (7, 5)}[device.index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert asked == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
