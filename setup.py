"""sbtrain: Megatron-Core training of SpikingBrain-style hybrid LLMs (CUDA, MetaX MACA, CPU)."""

from setuptools import find_packages, setup

setup(
    name="sbtrain",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["sbtrain*", "parallel*", "ops*", "maca_compat*"]),
    # ops/gla/tuned: fla autotune results seeded into Triton's cache (ops/gla/tuning.py)
    package_data={"sbtrain": ["data/assets/*"], "ops": ["gla/tuned/*/*.json", "gla/tuned/*/*/*.json"]},
    install_requires=[
        "torch>=2.6",
        # megatron-core 0.19.2 declares Requires-Python>=3.12 but its cp311 wheel works on 3.11:
        # scripts/setup_env.sh installs it with --ignore-requires-python first, so pip finds it
        # already satisfied here.
        "megatron-core==0.19.2",
        "numpy",
        "pyyaml",
        # dist_checkpointing's save worker imports psutil but megatron-core does not declare it.
        "psutil",
        # `import megatron.core` imports triton; fla-core provides the GPU GLA kernels.
        "triton",
        "fla-core",
        "einops",
        "tokenizers",
        # sbtrain convert reads and writes HF checkpoints (safetensors files).
        "safetensors",
        # sbtrain spikestats draws its PNG (Agg canvas, imported only when it writes one);
        # 3.6 for subplots(width_ratios=...).
        "matplotlib>=3.6",
    ],
    extras_require={
        "test": ["pytest", "transformers", "safetensors", "tensorboard"],
        # profiler.tensorboard / profiler.wandb sinks (docs/training.md section 7)
        "tracking": ["tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["sbtrain=sbtrain.cli:main"]},
)
