"""What the demo runs on: its photos (a public-domain identity shipped with the pack) and its IDDM settings.

Shared by the demo story (demo/story.py), the demo model's measurements (demo/model/measure.py), the benches and
the tests that replay the demo's run.
"""
from __future__ import annotations


def demo_photos():
    """Sample identity for the demo: two public-domain photos of one person plus their mirror images (4 photos)."""
    import numpy as np

    from .. import FACES_DIR as folder
    from ..images import Photo, load_rgb

    photos = []
    for name in ("obama.jpg", "obama2.jpg"):
        rgb = load_rgb(folder / name)
        photos.append(Photo(name, folder / name, rgb))
        photos.append(Photo("mirror_" + name, folder / name, np.ascontiguousarray(rgb[:, ::-1])))
    return photos


def demo_config():
    """Settings of the demo run on the 128 px demo model, each for a measured reason (not tuned on the result):
    no prior preservation (the toy's text encoder is random and frozen, so its UNet barely tells prompts apart and
    class images would pull straight against the instance images); Stage II timesteps below 100, where the
    model's one-step predictions are still faces dlib finds (``python -m iddm_core.demo.model measure``); the
    trainer's default learning rate (1e-4: at 1e-3 and above, 72 steps turn this toy's samples into noise)."""
    from ..protection.iddm import IDDMConfig
    from ..protection.pgd import PGDConfig

    return IDDMConfig(K=3, pgd=PGDConfig(T=8, rho=0.3, id_t_max=0.1), ft_steps=12, resolution=128,
                      prior_preservation=False, seed=0)
