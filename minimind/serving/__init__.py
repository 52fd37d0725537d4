"""Serving: an OpenAI-compatible HTTP server (server.py) over a continuous-batching engine (engine.py).

The wire format, requests checked and responses built, is protocol.py; the chat page is
minimind/assets/chat/. See docs/serving.md.
"""
from .engine import BatchingEngine, QueueFull, SamplingParams, Update

__all__ = ["BatchingEngine", "QueueFull", "SamplingParams", "Update"]
