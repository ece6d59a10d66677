"""Transformers classes of SpikingBrain-style models, copied verbatim into exported HF
directories (``sbtrain.convert.export``); nothing here imports sbtrain."""
