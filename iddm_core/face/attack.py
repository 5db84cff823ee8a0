"""Direct face attack: sign-PGD on one photo's pixels against a FaceEnsembleLoss.

This is IDDM's Stage II with the diffusion model taken out (the one-step prediction x0_hat is the perturbed
image itself). It is useful on its own, to check a surrogate ensemble and a budget (eta, alpha, steps) on real
photos in seconds, and :func:`sign_pgd_step` is the update the IDDM algorithm reuses.

Landmarks are detected once on the clean photo and reused at every step: re-detecting on the perturbed image
would let the attack move the crop instead of changing the face, and detectors are not differentiable.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..events import Callback, Emitter

DLIB_MATCH_THRESHOLD = 0.6   # dlib's documented same-person threshold on descriptor distance


@torch.no_grad()
def sign_pgd_step(x0: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float, eta: float) -> torch.Tensor:
    """One descent step: x - alpha * sign(grad), then projected to |x - x0|_inf <= eta and clipped to [0, 1].

    Projection before clipping keeps both constraints: clipping can only shrink |delta| because x0 is in [0, 1].
    """
    stepped = x - alpha * torch.sign(grad)
    delta = (stepped - x0).clamp(-eta, eta)
    return (x0 + delta).clamp(0.0, 1.0)


def check_budget(eta: float, alpha: float, steps: int) -> None:
    if not 0 < eta <= 1:
        raise InputError(f"eta must be in (0, 1] (pixel scale), got {eta}")
    if not 0 < alpha <= eta:
        raise InputError(f"alpha must be in (0, eta], got alpha={alpha}, eta={eta}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")


@dataclass
class AttackResult:
    image: torch.Tensor                       # [N, 3, H, W] protected images in [0, 1]
    history: list[dict] = field(default_factory=list)   # per step: loss and similarities at x_t, linf after it
    final: dict = field(default_factory=dict)            # loss and similarities of the returned images


def _summary(loss: torch.Tensor, sims: dict) -> dict:
    return {"loss": float(loss), "similarity": {k: float(v.mean()) for k, v in sims.items()}}


def face_attack(x0: torch.Tensor, landmarks: torch.Tensor, loss_fn, eta: float = 0.08, alpha: float = 0.008,
                steps: int = 8, callback: Optional[Callback] = None) -> AttackResult:
    """Minimise ``loss_fn(x, landmarks)`` (a FaceEnsembleLoss with references set) over x = clip01(x0 + delta),
    |delta|_inf <= eta, by ``steps`` sign-gradient steps of size ``alpha``. Emits one ``pgd`` Event per step."""
    check_budget(eta, alpha, steps)
    x0 = x0.detach()
    landmarks = landmarks.to(x0.device)
    x = x0.clone()
    emit = Emitter(callback, total=steps)
    history = []
    for t in range(1, steps + 1):
        x.requires_grad_(True)
        with _autocast(x.device):
            loss, sims = loss_fn(x, landmarks)
        (grad,) = torch.autograd.grad(loss, x)
        x = sign_pgd_step(x0, x.detach(), grad, alpha, eta)
        linf = float((x - x0).abs().max())
        record = {"t": t, **_summary(loss.detach(), sims), "linf": linf}
        history.append(record)
        emit("pgd", t=t, stage="id", loss=record["loss"], similarity=record["similarity"], linf=linf)
    with torch.no_grad():
        final = _summary(*loss_fn(x, landmarks))
    return AttackResult(x, history, final)


def _autocast(device: torch.device):
    """bf16 autocast where the device really has bf16 (recognisers run twice as fast; sign-PGD only needs the
    gradient's sign); fp32 elsewhere: the recognisers are small, and fp16 would need loss scaling."""
    import contextlib

    from ..diffusion.precision import precision_for

    policy = precision_for(device)
    return policy.autocast() if policy.dtype == torch.bfloat16 else contextlib.nullcontext()


# --- dlib's own C++ pipeline, as an independent judge -----------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _dlib_pipeline():
    import dlib

    from .dlib_files import RESNET, SHAPE_5, require_model

    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(require_model(SHAPE_5))),
            dlib.face_recognition_model_v1(str(require_model(RESNET))))


def dlib_native_descriptor(rgb: np.ndarray, upsample: int = 1) -> Optional[np.ndarray]:
    """dlib's 128-D descriptor of the largest face in ``rgb`` (uint8 H x W x 3) computed entirely by dlib
    (HOG detector, 5-point shape predictor, compute_face_descriptor), or None when dlib finds no face.
    It checks the PyTorch port and the attack from outside: nothing here shares code with them."""
    detector, predictor, model = _dlib_pipeline()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    rects = detector(rgb, upsample)
    if len(rects) == 0:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    return np.array(model.compute_face_descriptor(rgb, predictor(rgb, rect)), dtype=np.float64)


def dlib_prototype(rgbs: list[np.ndarray]) -> Optional[np.ndarray]:
    """Mean dlib descriptor of the reference photos in which dlib finds a face (None if it finds none)."""
    descs = [d for d in (dlib_native_descriptor(r) for r in rgbs) if d is not None]
    return np.mean(descs, axis=0) if descs else None


def dlib_distance(rgb: np.ndarray, prototype: Optional[np.ndarray]) -> Optional[float]:
    """Euclidean distance of ``rgb``'s dlib descriptor to ``prototype`` (> 0.6: dlib says another person)."""
    if prototype is None:
        return None
    desc = dlib_native_descriptor(rgb)
    return None if desc is None else float(np.linalg.norm(desc - prototype))
