"""How a decoder picks its tokens: the sampling settings that `generate`, `chat`, `eval`, the
server and GRPO's rollouts all take (their meanings are sampling.pick_next_token's). Free of torch,
so that the commands can offer them as flags before anything heavy is imported.
"""
from dataclasses import dataclass, field

# Defaults of the original MiniMind's eval script, the ones its models were tuned to sound right with.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS = 0.85, 0.85, 512


@dataclass
class SamplingSettings:
    """max_new_tokens: stop after this many; temperature 0 = greedy; top_k 0 and top_p 1 = all tokens;
    repetition_penalty 1 = off; seed None = a fresh random stream; stop_strings end the text."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = None
    stop_strings: list = field(default_factory=list)
