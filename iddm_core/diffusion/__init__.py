"""Diffusion models: loading and writing checkpoints (SD 1/2, SDXL, the pack's demo and tiny models), the original
key layout, and how a run uses the hardware (precision, activation checkpointing, the memory fit check)."""
