"""Direct face attack: PGD on one photo's pixels against a FaceEnsembleLoss.

This is IDDM's Stage II with the diffusion model taken out (the one-step prediction x0_hat is the perturbed
image itself). It is useful on its own, to check a surrogate ensemble and a budget (eta, alpha, steps, PSNR
floor) on real photos in seconds, and :func:`sign_pgd_step` is the update the IDDM algorithm reuses. Under the
L_inf budget alone the steps are sign steps; with a PSNR floor (face/budget.py) they are L2 steps.

Landmarks are detected once on the clean photo and reused at every step: re-detecting on the perturbed image
would let the attack move the crop instead of changing the face, and detectors are not differentiable. A judge
does detect the face again, though, so the attack can average over landmark jitter and crop changes
(face/transfer.py) instead of fitting one exact alignment.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..events import Callback, Emitter
from .budget import check_psnr, l2_pgd_step, l2_radius
from .transfer import DEFAULT_STEPS, TransferOptions, draw, steer

DLIB_MATCH_THRESHOLD = 0.6   # dlib's documented same-person threshold on descriptor distance


@torch.no_grad()
def sign_pgd_step(x0: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float, eta: float) -> torch.Tensor:
    """One descent step: x - alpha * sign(grad), then projected to |x - x0|_inf <= eta and clipped to [0, 1].

    Projection before clipping keeps both constraints: clipping can only shrink |delta| because x0 is in [0, 1].
    """
    stepped = x - alpha * torch.sign(grad)
    delta = (stepped - x0).clamp(-eta, eta)
    return (x0 + delta).clamp(0.0, 1.0)


def check_budget(eta: float, alpha: Optional[float], steps: int) -> None:
    if not 0 < eta <= 1:
        raise InputError(f"eta must be in (0, 1] (pixel scale), got {eta}")
    if alpha is not None and not 0 < alpha <= eta:
        raise InputError(f"alpha must be in (0, eta], got alpha={alpha}, eta={eta}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")


def step_size(eta: float, steps: int, alpha: Optional[float] = None) -> float:
    """``alpha``, or by default 2.5 eta / steps (Madry et al.'s rule), at most eta: the steps can reach the edge of
    the budget in 40 % of them and spend the rest along it. (A fixed 0.008 with 8 steps moves at most 0.064 of
    an 0.08 budget: a single PGD call never used a fifth of it.)"""
    return float(alpha) if alpha else min(eta, 2.5 * eta / steps)


@dataclass
class AttackResult:
    image: torch.Tensor                       # [N, 3, H, W] protected images in [0, 1]
    history: list[dict] = field(default_factory=list)   # per step: loss, similarities, weights at x_t; linf after
    final: dict = field(default_factory=dict)            # loss, similarities, weights of the returned images


def _summary(out) -> dict:
    """Loss, mean similarity and mean ensemble weight per recogniser of an :class:`~.ensemble.IdentityLoss`."""
    return {"loss": float(out.loss.detach()), "similarity": {k: float(v.mean()) for k, v in out.similarity.items()},
            "weights": {k: round(float(v.mean()), 6) for k, v in out.weights.items()}}


def face_attack(x0: torch.Tensor, landmarks: torch.Tensor, loss_fn, eta: float = 0.08, alpha: Optional[float] = None,
                steps: int = DEFAULT_STEPS, callback: Optional[Callback] = None,
                transfer: Optional[TransferOptions] = None, psnr: Optional[float] = None,
                regions: Optional[torch.Tensor] = None) -> AttackResult:
    """Minimise the identity loss of ``loss_fn`` (a FaceEnsembleLoss with references set) over
    x = clip01(x0 + delta), |delta|_inf <= eta, by ``steps`` sign-gradient steps of size ``alpha`` (default
    :func:`step_size`). ``transfer`` adds momentum, crop diversity, landmark jitter, gradient smoothing
    (face/transfer.py); its random draws come from a generator seeded 0 per image, so a run is repeatable.

    With ``psnr`` (dB) the budget is also an L2 ball, PSNR >= ``psnr`` on each of ``regions`` ([N, R, H, W]
    disjoint masks, e.g. :func:`~.budget.box_regions`: the face box and the rest of the photo; default the whole
    image); pixels in no region stay as they are, and the steps are normalised-gradient (L2-PGD) steps of length
    2.5 radius / steps (face/budget.py).
    Emits one ``pgd`` Event per step; the history records the similarities and ensemble weights per step."""
    check_budget(eta, alpha, steps)
    check_psnr(psnr)
    alpha = step_size(eta, steps, alpha)
    transfer = (transfer or TransferOptions()).validate()
    x0 = x0.detach()
    landmarks = landmarks.to(x0.device)
    x = x0.clone()
    if psnr is not None:
        regions = (torch.ones_like(x0[:, :1]) if regions is None else regions).to(x0.device, x0.dtype)
        radius = l2_radius(regions, x0.shape[1], psnr)
        l2_step = 2.5 * radius.norm(dim=1) / steps
    gens = [torch.Generator().manual_seed(0) for _ in range(x0.shape[0])]
    velocity = torch.zeros_like(x0) if transfer.momentum > 0 else None
    emit = Emitter(callback, total=steps)
    history = []
    for t in range(1, steps + 1):
        x.requires_grad_(True)
        with _autocast(x.device):
            out = loss_fn.identity_loss(x, landmarks, draw(transfer, gens, landmarks.shape[1]))
        (grad,) = torch.autograd.grad(out.loss, x)
        direction = steer(grad, transfer, velocity)
        if psnr is None:
            x = sign_pgd_step(x0, x.detach(), direction, alpha, eta)
        else:
            x = l2_pgd_step(x0, x.detach(), direction, l2_step, eta, radius, regions)
        linf = float((x - x0).abs().max())
        record = {"t": t, **_summary(out), "linf": linf}
        history.append(record)
        emit("pgd", t=t, stage="id", loss=record["loss"], similarity=record["similarity"], linf=linf)
    with torch.no_grad():
        final = _summary(loss_fn.identity_loss(x, landmarks))
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
