"""Judging a LoRA: portraits it generates, face-recognition metrics with held-out judges, the Leak Meter's drawing."""
