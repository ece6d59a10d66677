"""sbtrain: Megatron-Core training for SpikingBrain-style hybrid models."""

__version__ = "0.1.0"
