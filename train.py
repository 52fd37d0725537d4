"""Train a MiniMind model: `python train.py --help` lists every flag. Same as `minimind train`."""
import sys

from minimind.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
