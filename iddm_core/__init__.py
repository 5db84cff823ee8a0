"""IDDM — Identity-Decoupled personalized Diffusion Models.

A plain library (never imports ComfyUI). Importing this package is cheap: heavy modules
(torch, diffusers, dlib) are imported by the submodules that need them.
"""
__version__ = "0.1.0"
