"""Train a MiniMind model: `python train.py --help` lists every flag. Same as `minimind train`."""
from minimind.commands.main import exit_process
from minimind.commands.train import main

if __name__ == "__main__":
    exit_process(main())
