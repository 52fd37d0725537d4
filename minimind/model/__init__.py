"""The model: its shape (config.py), the network itself (model.py, the textbook file, with its
speed kernels in kernels.py), reading and writing its weights (checkpoint.py), LoRA adapters
(lora.py)."""
