"""Serving: an OpenAI-compatible HTTP server (server.py) over a continuous-batching engine (engine.py).

The wire format, requests checked and responses built, is protocol.py; the chat page is
minimind/assets/chat/. See docs/serving.md.
"""
from ..settings import SamplingSettings
from .engine import BatchingEngine, QueueFull, Update

__all__ = ["BatchingEngine", "QueueFull", "SamplingSettings", "Update"]
