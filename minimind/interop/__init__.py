"""Interoperability: the stock transformers layouts our models map to and from (stock_layouts.py),
GGUF for llama.cpp and Ollama (gguf.py), and `minimind export`'s writer (export.py)."""
