"""Inference: loading a trained model (loading.py), picking tokens (settings.py, sampling.py), the
decode loop (decoding.py), the terminal chat's display (chat.py), evaluation (evaluation.py) and
the HTTP server (serving/)."""
