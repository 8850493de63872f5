"""LoRA and other PEFT adapters on models whose weights vramfx streams.

- :mod:`~vramfx.adapters.hosting`: adapters added to streamed layers keep their values in host memory.
- :mod:`~vramfx.adapters.state`: what a compiled graph depends on (structure) and what it reads
  each call (values), read from the model's adapter layers.
- :mod:`~vramfx.adapters.scales`: LoRA scales captured as graph attributes refreshed every call.
- :mod:`~vramfx.adapters.fused`: a fused LoRA applied to a streamed weight after it is fetched.
- :mod:`~vramfx.adapters.binding`: one compiled graph's adapter values kept current.
"""
