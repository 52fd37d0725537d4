"""The commands layer: every verb of `minimind` (and `python train.py`), each a module that turns
flags into the library's typed settings, calls the library and prints for people. The library
never imports this package. See main.py."""
