"""Model accounting: parameter counts, model FLOPs, memory estimates, run plans, step tracking.

Importing this package does not import torch or touch a device; the tracker looks the device
module up only when it measures.
"""

from sbtrain.profiler.counting import count_parameters
from sbtrain.profiler.flops import flops_per_token, window_avg_keys
from sbtrain.profiler.memory import estimate_memory_per_rank
from sbtrain.profiler.plan import default_world_size, format_plan, make_plan
from sbtrain.profiler.tracker import StepStats, ThroughputTracker, format_step

__all__ = [
    "StepStats", "ThroughputTracker", "count_parameters", "default_world_size",
    "estimate_memory_per_rank", "flops_per_token", "format_plan", "format_step", "make_plan",
    "window_avg_keys",
]
