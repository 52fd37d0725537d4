"""Train a MiniMind model: `python train.py --help` lists every flag. Same as `minimind train`."""
import sys

from minimind.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
