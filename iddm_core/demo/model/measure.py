"""What the demo model can do, measured on the held-out demo identity (``python -m iddm_core.demo.model measure``).

Distances are dlib's own (``face.attack.dlib_native_descriptor``: dlib's C++ detector, 5-point alignment and
descriptor; Euclidean, dlib calls < 0.6 the same person). Identity scores (ISM) of generated samples use the
pipeline's dlib recogniser and the cosine to each identity's prototype, as ``evaluate`` does.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...evaluation.faces import uint8_images
from .data import FACE_DIR, HELD_OUT

IDENTITIES = {"demo person": HELD_OUT, "biden": ("biden.jpg",), "astronaut": ("astronaut.jpg",)}
ONE_STEP_TIMESTEPS = (25, 50, 100, 200, 300, 400, 500, 600, 700, 800)
KEEP_DISTANCE = 0.5
DENOISE_TIMESTEPS = (10, 50, 100, 200, 400)    # where the denoising error is compared


def native_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """dlib's own distance between the largest faces of two uint8 images (None if either has no face)."""
    from ...face.attack import dlib_distance, dlib_native_descriptor

    return dlib_distance(a, dlib_native_descriptor(b))


def demo_crops(resolution: int, detector=None):
    """The held-out identity's photos cropped as the pipeline crops a user's photos: (images, landmarks)."""
    from ...images import Photo, load_rgb
    from ...protection.refs import prepare_photos

    if detector is None:
        from ...face.detect import get_detector

        detector = get_detector("dlib")
    photos = [Photo(n, FACE_DIR / n, load_rgb(FACE_DIR / n)) for n in HELD_OUT]
    images, landmarks, _, _ = prepare_photos(photos, resolution, detector, skip_faceless=False)
    return images, landmarks


@torch.no_grad()
def vae_round_trip(bundle, images: torch.Tensor) -> torch.Tensor:
    """decode(mean of encode(x)) in [0, 1]."""
    mean = bundle.vae.encode(images * 2 - 1).latent_dist.mean
    return ((bundle.vae.decode(mean).sample + 1) / 2).clamp(0, 1)


def latent_shape(bundle, images: torch.Tensor) -> tuple:
    """Shape of the (scaled) latents of an image batch in this bundle."""
    f = bundle.vae_scale_factor
    return images.shape[0], bundle.unet.config.in_channels, images.shape[-2] // f, images.shape[-1] // f


@torch.no_grad()
def one_step_predictions(bundle, images: torch.Tensor, t: int, seed: int, prompt: str) -> torch.Tensor:
    """x0_hat of each image at timestep t: the decoded one-step clean prediction PGD's Stage II scores."""
    from ...training.conditioning import encode_prompts
    from ...protection.pgd import Noise, predict_clean_image

    gen = torch.Generator().manual_seed(seed)
    shape = latent_shape(bundle, images)
    dev = images.device
    noise = Noise(posterior=torch.randn(shape, generator=gen).to(dev),
                  t=torch.full((images.shape[0],), t, dtype=torch.long, device=dev),
                  eps=torch.randn(shape, generator=gen).to(dev))
    embeds = encode_prompts(bundle, [prompt]).expand(images.shape[0], -1, -1)
    return predict_clean_image(bundle, images, embeds, noise).clamp(0, 1)


@torch.no_grad()
def denoising_error(bundle, images: torch.Tensor, t: int, seed: int, prompt: str, draws: int = 4) -> float:
    """Stage I's L_rec (MSE of the model's target: epsilon, or v for a v-prediction model such as the demo model)
    of ``images`` at timestep ``t``, latents at the posterior mean, averaged over
    ``draws`` noise draws. Predicting zero scores about 1.0: above that the model does not denoise these images, it pulls
    them elsewhere."""
    from ...training.conditioning import encode_prompts
    from ...protection.pgd import Noise, rec_loss

    gen = torch.Generator().manual_seed(seed)
    shape = latent_shape(bundle, images)
    dev = images.device
    embeds = encode_prompts(bundle, [prompt]).expand(images.shape[0], -1, -1)
    t_all = torch.full((images.shape[0],), t, dtype=torch.long, device=dev)
    values = [rec_loss(bundle, images, embeds, Noise(posterior=torch.zeros(shape, device=dev), t=t_all,
                                                     eps=torch.randn(shape, generator=gen).to(dev)))[1]
              for _ in range(draws)]
    return float(torch.stack(values).mean())


def identity_prototypes(recognizer, detector) -> dict[str, torch.Tensor]:
    """Prototype embedding (pipeline dlib recogniser) of every identity, from its whole photos."""
    from ...evaluation.faces import embed_photos
    from ...evaluation.metrics import prototype
    from ...images import load_rgb

    return {who: prototype(embed_photos(recognizer, [load_rgb(FACE_DIR / n) for n in files], detector))
            for who, files in IDENTITIES.items()}


def installed_judges(names, detector) -> dict:
    """{name: (recogniser, identity prototypes)} for each of ``names`` that is installed, in order (faceres may
    not be: dlib alone then)."""
    from ...face.registry import find, load_recognizer

    judges = {}
    for name in names:
        spec = find(name, [])
        if spec.available:
            recognizer = load_recognizer(spec)
            judges[name] = (recognizer, identity_prototypes(recognizer, detector))
    return judges


@dataclass
class IdentityScores:
    fsr: float                       # share of images with a face dlib finds
    ism: dict                        # identity -> mean cosine of the found faces to its prototype
    linked: float | None             # share of found faces closest to the target identity
    n: int


def identity_scores(images: torch.Tensor, protos: dict, recognizer, detector=None, target: str = "demo person",
                    scan=None):
    """FSR, ISM per identity and linked share of ``images``; faces found by ``detector``, or given as ``scan``
    (an ``evaluate.scan_faces`` result of these images, so several judges share one detection pass)."""
    from ...evaluation.faces import embed, scan_faces
    from ...evaluation.metrics import cosine_to

    scan = scan if scan is not None else scan_faces(images, detector)
    fsr = sum(scan.found) / len(scan.found)
    if not scan.index:
        return IdentityScores(fsr, {k: None for k in protos}, None, len(scan.found))
    emb = embed(recognizer, images[scan.index], scan.landmarks)
    sims = {who: cosine_to(emb, p) for who, p in protos.items()}
    stacked = torch.stack([sims[w] for w in protos])
    best = stacked.argmax(dim=0)
    linked = float((best == list(protos).index(target)).float().mean())
    return IdentityScores(fsr, {w: float(s.mean()) for w, s in sims.items()}, linked, len(scan.found))


def format_scores(label: str, s: IdentityScores) -> str:
    ism = "  ".join(f"{w} {v:.3f}" if v is not None else f"{w} -" for w, v in s.ism.items())
    linked = f"{s.linked:.2f}" if s.linked is not None else "-"
    return f"{label:<22} FSR {s.fsr:.2f} ({s.n} samples)  ISM  {ism}  linked-to-target {linked}"


def dreambooth(bundle, images: torch.Tensor, steps: int, lr: float, rank: int = 4, seed: int = 0):
    """A plain DreamBooth-LoRA (no protection) on ``images``; returns the trainer (LoRA active on ``bundle``)."""
    from ...training.finetune import DreamBoothTrainer, FinetuneConfig
    from ...training.lora import LoraSpec

    cfg = FinetuneConfig(lr=lr, seed=seed, resolution=images.shape[-1], prior_preservation=False,
                         mixed_precision="no", gradient_checkpointing="no", batch_size=2)
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=rank), cfg)
    trainer.train(images, steps)
    return trainer


def full_dreambooth(bundle, images: torch.Tensor, steps: int, lr: float, prompt: str = "a photo of sks person",
                    seed: int = 0) -> None:
    """DreamBooth as its paper does it: the whole UNet fine-tuned on ``images`` (in [0, 1]) with Stage I's L_rec
    (``pgd.rec_loss``: epsilon or v target, uniform timesteps), batch = all images, AdamW. Changes ``bundle.unet``
    in place. Not the pack's product path (that is the DreamBooth-*LoRA* of ``finetune``): the demo model's LoRA
    is too small to learn a new face (docs/DESIGN.md), its whole UNet is not."""
    from ...training.conditioning import encode_prompts
    from ...protection.pgd import Noise, rec_loss

    unet = bundle.unet.train()
    unet.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    with torch.no_grad():
        embeds = encode_prompts(bundle, [prompt]).expand(images.shape[0], -1, -1)
    gen = torch.Generator().manual_seed(seed)
    shape = latent_shape(bundle, images)
    steps_total = bundle.noise_scheduler.config.num_train_timesteps
    for _ in range(steps):
        noise = Noise(posterior=torch.randn(shape, generator=gen), eps=torch.randn(shape, generator=gen),
                      t=torch.randint(0, steps_total, (images.shape[0],), generator=gen))
        loss, _ = rec_loss(bundle, images, embeds, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)


def protection_effect(args, protos: dict, sample_detector) -> None:
    """Item 5: the demo's IDDM run, then a full-UNet DreamBooth on the clean photos (Xc + X0) and on the protected
    ones (Xc + X'), each from the shipped model; samples scored by every judge in ``protos``."""
    from ...evaluation.metrics import psnr
    from ..inputs import demo_config, demo_photos
    from ...face.detect import get_detector
    from ...training.sampling import generate_images
    from ...protection.iddm import run_iddm
    from ...protection.refs import refs_from_photos
    from ...diffusion.builtin import ASSET_DIR
    from ...diffusion.loading import load_demo_bundle

    base = load_demo_bundle(Path(args.model) if args.model else ASSET_DIR)
    config = demo_config().validate()
    refs = refs_from_photos(demo_photos(), config.resolution, get_detector("dlib"), seed=config.seed)
    protected = run_iddm(copy.deepcopy(base), refs, config).protected
    (xc, _), (x0, _) = refs.reference(), refs.protect()
    print(f"5. IDDM's effect on a full-UNet DreamBooth ({args.full_dreambooth} steps, lr 1e-4, 'a photo of sks "
          f"person'): the demo's IDDM run (X' PSNR {float(psnr(protected, x0).mean()):.1f} dB), then the shipped model "
          f"fine-tuned on the clean photos Xc + X0 or on Xc + X'; {args.samples} samples each (DDIM 25, guidance 5)")
    for label, train in (("clean Xc + X0", torch.cat([xc, x0])), ("IDDM Xc + X'", torch.cat([xc, protected]))):
        bundle = copy.deepcopy(base)
        full_dreambooth(bundle, train, args.full_dreambooth, lr=1e-4)
        with torch.no_grad():
            samples = generate_images(bundle, "a photo of sks person", args.samples, seed=1, steps=25,
                                      guidance_scale=5.0)
        for name, (recognizer, p) in protos.items():
            print("   " + format_scores(f"{label} ({name})", identity_scores(samples, p, recognizer, sample_detector)))


def cmd_measure(args) -> int:
    from ...evaluation.faces import sample_detector_name
    from ...evaluation.metrics import psnr
    from ...face.detect import get_detector
    from ...face.registry import load_recognizer, parse_surrogates
    from ...training.sampling import generate_images
    from ...diffusion.builtin import ASSET_DIR
    from ...diffusion.loading import load_demo_bundle

    t_start = time.time()
    torch.manual_seed(0)
    bundle = load_demo_bundle(Path(args.model) if args.model else ASSET_DIR)
    detector = get_detector("dlib")
    images, _ = demo_crops(bundle.resolution, detector)
    rgb = uint8_images(images)

    print(f"demo model: {bundle.title}, {bundle.resolution} px, held-out identity = the two demo photos")
    recon = vae_round_trip(bundle, images)
    dists = [native_distance(a, b) for a, b in zip(rgb, uint8_images(recon))]
    print("1. VAE round trip of the demo photos")
    print(f"   PSNR {', '.join(f'{v:.2f}' for v in psnr(recon, images).tolist())} dB;  "
          f"dlib distance photo-round trip {', '.join('no face' if d is None else f'{d:.3f}' for d in dists)}")

    from .data import face_pool

    train_faces = torch.from_numpy(face_pool(len(images), bundle.resolution, seed=99, detector=detector)[0])
    train_faces = train_faces.permute(0, 3, 1, 2).float() / 255
    target = "v" if bundle.prediction_type == "v_prediction" else "epsilon"
    print(f"2. UNet denoising error ({target} MSE; predicting zero scores about 1) on the demo photos vs on augmented "
          "training faces, prompt 'a photo of sks person':")
    print("   " + "  ".join(f"t={t}: {denoising_error(bundle, images, t, 0, 'a photo of sks person'):.3f} vs "
                          f"{denoising_error(bundle, train_faces, t, 0, 'a photo of sks person'):.3f}"
                          for t in DENOISE_TIMESTEPS))

    from ...face.attack import dlib_distance, dlib_prototype

    proto = dlib_prototype(rgb)
    print("3. one-step clean prediction x0_hat (prompt 'a photo of sks person', 4 noise draws per photo):"
          " mean dlib distance to the person's prototype")
    keep, kept = None, True
    for t in ONE_STEP_TIMESTEPS:
        ds, found = [], 0
        for seed in range(4):
            for x in uint8_images(one_step_predictions(bundle, images, t, seed, "a photo of sks person")):
                d = dlib_distance(x, proto)
                if d is not None:
                    ds.append(d)
                    found += 1
        mean = float(np.mean(ds)) if ds else None
        total = 4 * len(rgb)
        print(f"   t={t:<4d} distance {'-' if mean is None else f'{mean:.3f}'}  (face found {found}/{total})")
        kept = kept and mean is not None and mean <= KEEP_DISTANCE and found == total
        keep = t if kept else keep
    print(f"   identity kept (mean distance <= {KEEP_DISTANCE}, face in every prediction) up to t = {keep}")

    recognizer = load_recognizer(parse_surrogates("dlib")[0])
    protos = identity_prototypes(recognizer, detector)
    sample_detector = get_detector(sample_detector_name(bundle.resolution))
    steps = args.dreambooth_steps or 150
    print(f"4. DreamBooth-LoRA on the two demo photos and their mirrors ('a photo of sks person', {steps} steps, "
          "lr 1e-4, rank 4, no prior preservation), "
          f"{args.samples} samples (DDIM 25 steps, guidance 5)")
    with torch.no_grad():
        base = generate_images(bundle, "a photo of sks person", args.samples, seed=1, steps=25, guidance_scale=5.0)
    print("   " + format_scores("base model", identity_scores(base, protos, recognizer, sample_detector)))
    trainer = dreambooth(bundle, torch.cat([images, images.flip(-1)]), steps, lr=1e-4)
    with torch.no_grad():
        tuned = generate_images(bundle, "a photo of sks person", args.samples, seed=1, steps=25, guidance_scale=5.0)
    print("   " + format_scores("after DreamBooth", identity_scores(tuned, protos, recognizer, sample_detector)))
    del trainer
    if args.full_dreambooth:
        protection_effect(args, installed_judges(("dlib", "faceres"), detector), sample_detector)
    print(f"({time.time() - t_start:.0f} s)")
    return 0
