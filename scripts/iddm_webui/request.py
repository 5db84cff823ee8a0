"""The IDDM tab's settings as plain values: :class:`TrainRequest` (one field per input of the Train button, in
order) and the names of the fields the Preview button reads."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from . import webui


@dataclass
class TrainRequest:
    """Every field of the tab, as plain values, in the order of the Train button's inputs."""

    checkpoint: str = webui.CURRENT_CHOICE
    photos_folder: str = ""
    uploads: Any = None                 # gradio's file list: 3.41 temp-file objects, 4.x paths
    n_reference: int = 0
    split_seed: int = 0
    skip_faceless: bool = True
    reference_files: str = ""
    preset: str = "privacy"
    T: int = 8
    rho: float = 0.1
    eta: float = 0.08
    alpha: float = 0.008
    gradient: str = "full"
    pgd_batch: int = 1
    surrogates: Any = ("dlib",)
    extra_surrogates: str = ""
    tau: float = 0.03
    K: int = 10
    ft_steps: int = 40
    rank: int = 4
    conv_rank: int = 0                  # LoCon on the UNet's convolutions, 0 = off
    lr: float = 1e-4
    resolution: int = 0
    seed: int = 0
    prior_preservation: bool = True
    num_class_images: int = 8
    train_text_encoder: bool = False
    resume: bool = True
    lora_name: str = "iddm_lora"
    overwrite: bool = False
    tokenizer: str = ""


FIELDS = tuple(f.name for f in fields(TrainRequest))
PREVIEW_FIELDS = ("checkpoint", "photos_folder", "uploads", "n_reference", "split_seed", "skip_faceless",
                  "reference_files", "resolution", "tokenizer")
