"""One device policy for training and inference (minimind/devices.py)."""
import pytest
import torch

from minimind.commands.main import main as cli_main
from minimind.devices import resolve_device
from minimind.errors import UserError


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only policy")
def test_auto_is_the_cpu_here_and_an_absent_device_is_an_error(capsys):
    assert resolve_device("auto") == torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda:0: CUDA is not available on this machine; use --device auto"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="--device gpu0: not a device name"):
        resolve_device("gpu0")
    # the same answer from training and from inference, before any model or data is read
    for argv in (["train", "--device", "cuda", "--data", "nothing.jsonl"], ["generate", "--device", "cuda", "--model",
                                                                            "nothing", "--prompt", "x"]):
        assert cli_main(argv) == 2
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
