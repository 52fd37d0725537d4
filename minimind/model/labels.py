"""The label of a position that has nothing to predict (padding, a prompt, the user's turns): the
next-token loss skips it, as PyTorch's cross_entropy skips ignore_index. Its own module, free of
torch, so that the stage table (read by `train --help`) can count labelled tokens too."""
IGNORE_INDEX = -100
