"""The demo: the same photos and seeds, a no-defense DreamBooth LoRA against an IDDM LoRA, on the demo model.

What it shows: the demo model (``iddm_core.demo.model``) is small, trained here on two other identities and
never on the demo person, so whatever a LoRA knows of that person comes from the demo photos (within the demo's
budget this toy's DreamBooth learns little of them: docs/DESIGN.md, "The demo model"). Both LoRAs get the
same schedule (K iterations of a burst on the reference set Xc, then a burst on the protection set); the only
difference is that IDDM's second burst trains on X' (the PGD-protected photos) where the no-defense one trains
on the clean X0. Samples from both are scored by dlib, the attack's surrogate, and by faceres, a recogniser held
out from the attack (face found? whom does it link the face to?).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .inputs import demo_config, demo_photos

DEMO_PROMPT = "a photo of sks person"
DEMO_SAMPLES = 4             # per LoRA: a few, so the demo stays under a minute on 2 cores
SAMPLE_SEED = 1000            # fixed: the same initial noise for both LoRAs (never tuned)
SAMPLE_STEPS = 25
SAMPLE_GUIDANCE = 5.0
DENOISE_TIMESTEPS = (50, 100)  # where the demo model's one-step predictions are still faces dlib finds (measured)
DENOISE_SEEDS = (0, 1)

DEMO_NOTE = (
    "What a toy can and cannot show: the demo model is a ~7M-parameter diffusion model trained here in about two "
    "hours on 2 CPU cores from two public-domain faces (plus other images) at 128 px. Its VAE reconstructs the "
    "held-out demo photos (PSNR about 30 dB) and its denoiser keeps their identity up to timestep 100, so Stage II "
    "really pushes X' away from the person; its samples are faces (found by dlib's CNN detector), and both LoRAs "
    "above are real runs on the same photos, seeds and schedule. But it knows only two faces: its samples show "
    "those two people, and a LoRA on it does not learn a new person, so the sample rows cannot differ by whom "
    "they show. A full fine-tune of its UNet does learn the person, and there IDDM's X' lowers the samples' "
    "similarity (`python -m iddm_core.demo.model measure --full-dreambooth 400`, about 7 minutes; "
    "docs/DESIGN.md has the numbers). dlib is the attack's surrogate, so its numbers measure the attack "
    "itself; faceres (held out) is the fair test of whether the protection transfers. None of this is evidence "
    "about Stable Diffusion. Use --model with a real SD 1.x/2.x or SDXL checkpoint "
    "(`python -m iddm_core train --help`) for a real run.")


def train_no_defense(bundle, refs, config, class_images=None):
    """The baseline: IDDM's exact fine-tuning schedule with X' = X0 (no protection). Returns the trainer."""
    from ..training.finetune import DreamBoothTrainer
    from ..protection.iddm import finetune_config
    from ..training.lora import LoraSpec

    spec = LoraSpec(rank=config.rank, alpha=config.lora_alpha, train_text_encoder=config.train_text_encoder)
    trainer = DreamBoothTrainer(bundle, spec, finetune_config(config, refs.resolution), class_images=class_images)
    x_ref, _ = refs.reference()
    x_clean, _ = refs.protect()
    ref_posterior, clean_posterior = trainer.encode(x_ref), trainer.encode(x_clean)
    for _ in range(config.K):
        trainer.train(ref_posterior, config.ft_steps)
        trainer.train(clean_posterior, config.ft_steps)
    return trainer


def sample(bundle, n: int = DEMO_SAMPLES) -> torch.Tensor:
    """``n`` samples of the demo prompt (CPU tensor, as generate_images returns)."""
    from ..training.sampling import generate_images

    return generate_images(bundle, DEMO_PROMPT, n, seed=SAMPLE_SEED, steps=SAMPLE_STEPS,
                           guidance_scale=SAMPLE_GUIDANCE)


def denoise(bundle, images: torch.Tensor) -> torch.Tensor:
    """The model's one-step clean predictions x0_hat of ``images`` noised to each of ``DENOISE_TIMESTEPS`` with
    each of ``DENOISE_SEEDS`` (same noise for every model): what its denoiser makes of the person's photos."""
    from .model.measure import one_step_predictions

    images = images.to(bundle.device)
    return torch.cat([one_step_predictions(bundle, images, t, seed, DEMO_PROMPT).cpu()
                      for t in DENOISE_TIMESTEPS for seed in DENOISE_SEEDS])


@dataclass
class JudgeScores:
    """One recogniser's view of the demo: ``role`` is "surrogate" (the attack optimised against it) or
    "held out" (it never saw the attack: the fair test)."""
    name: str
    role: str
    rows: dict                  # label -> IdentityScores of the samples
    denoise_rows: dict          # label -> IdentityScores of one-step denoisings of the clean photos
    similarity_before: float    # cosine of X0 to the reference set's prototype
    similarity_after: float     # ... of X'


@dataclass
class DemoResult:
    judges: list                # JudgeScores: dlib (the surrogate), then faceres (held out)
    psnr: float                 # X' against X0
    sheet: Path
    seconds: float


DEMO_JUDGES = (("dlib", "surrogate"), ("faceres", "held out"))   # faceres ships with the pack


def run_demo(out_dir, device="cpu", callback=None) -> DemoResult:
    from PIL import Image

    from ..atomic import atomic_write
    from .model.measure import identity_scores, installed_judges
    from ..evaluation.faces import embed, sample_detector_name, scan_faces
    from ..evaluation.metrics import cosine_to, prototype, psnr
    from ..face.detect import get_detector
    from ..protection.iddm import run_iddm
    from ..training.kohya import save_kohya_lora
    from ..training.lora import LoraSpec
    from ..diffusion.loading import load_model
    from ..protection.refs import refs_from_photos

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = demo_config().validate()
    detector = get_detector("dlib")
    bundle = load_model("demo", device=device)
    plain = copy.deepcopy(bundle)          # the no-defense run's own copy (loading again costs ~4 s)
    refs = refs_from_photos(demo_photos(), config.resolution, detector, seed=config.seed)

    result = run_iddm(bundle, refs, config, out_path=out_dir / "iddm_lora.safetensors", lora_name="iddm_demo",
                      report_path=out_dir / "report.json", overwrite=True, callback=callback)
    with torch.no_grad():
        iddm_samples = sample(bundle)
        iddm_denoised = denoise(bundle, refs.images)

    trainer = train_no_defense(plain, refs, config)
    spec = LoraSpec(rank=config.rank, alpha=config.lora_alpha, train_text_encoder=config.train_text_encoder)
    save_kohya_lora(out_dir / "no_defense_lora.safetensors", plain, spec, output_name="no_defense_demo",
                    overwrite=True)
    with torch.no_grad():
        plain_samples = sample(plain)
        plain_denoised = denoise(plain, refs.images)
    del trainer

    x_ref, lm_ref = refs.reference()
    x0, lm0 = refs.protect()
    sample_detector = get_detector(sample_detector_name(config.resolution))
    plain_scan, iddm_scan = scan_faces(plain_samples, sample_detector), scan_faces(iddm_samples, sample_detector)
    judges, roles = [], dict(DEMO_JUDGES)
    # faceres not installed: dlib alone (format_result says so)
    for name, (recognizer, protos) in installed_judges(roles, detector).items():
        role = roles[name]
        reference = prototype(embed(recognizer, x_ref, lm_ref))
        judges.append(JudgeScores(
            name, role,
            {"no-defense LoRA": identity_scores(plain_samples, protos, recognizer, scan=plain_scan),
             "IDDM LoRA": identity_scores(iddm_samples, protos, recognizer, scan=iddm_scan)},
            {"no-defense LoRA": identity_scores(plain_denoised, protos, recognizer, detector),
             "IDDM LoRA": identity_scores(iddm_denoised, protos, recognizer, detector)},
            float(cosine_to(embed(recognizer, x0, lm0), reference).mean()),
            float(cosine_to(embed(recognizer, result.protected, lm0), reference).mean())))
    fidelity = float(psnr(result.protected, x0).mean())

    sheet = contact_rows([("X0 (clean)", x0), ("X' (IDDM)", result.protected),
                          ("no-defense samples", plain_samples), ("IDDM samples", iddm_samples)])
    sheet_path = out_dir / "contact_sheet.png"
    atomic_write(sheet_path, lambda tmp: Image.fromarray(sheet).save(tmp, "PNG"), overwrite=True)
    return DemoResult(judges, fidelity, sheet_path, time.perf_counter() - t0)


def contact_rows(rows):
    """A contact sheet (uint8 H x W x 3): one row of tiles per (label, images) pair, the label on its first tile."""
    from ..evaluation.faces import uint8_images
    from ..evaluation.leak_render import annotate, contact_sheet, enlarge

    columns = max(len(images) for _, images in rows)
    tiles = []
    for label, images in rows:
        rgbs = [enlarge(rgb) for rgb in uint8_images(images)]
        rgbs[0] = annotate(rgbs[0], label, (60, 60, 60))
        blank = rgbs[0] * 0 + 255
        tiles += rgbs + [blank] * (columns - len(rgbs))
    return contact_sheet(tiles, columns)


def format_result(r: DemoResult) -> str:
    from .model.measure import format_scores

    lines = ["", "Same photos, same seeds, same fine-tuning schedule; only the protection differs. IDDM attacked "
             "dlib (the surrogate); faceres never saw the attack (held out: the fair test).",
             f"samples: '{DEMO_PROMPT}', {DEMO_SAMPLES} per LoRA, seed {SAMPLE_SEED} (ISM = mean cosine to each "
             "identity's prototype; linked = share of faces closest to the demo person)"]
    for j in r.judges:
        lines += [f"  {j.name} ({j.role})"] + ["    " + format_scores(label, s) for label, s in j.rows.items()]
    if all(s.fsr == 0 for j in r.judges for s in j.rows.values()):
        lines.append("  no face is found in either LoRA's samples, so they cannot be scored. Next best, below.")
    lines += [f"what each LoRA's denoiser makes of the demo person's clean photos (one-step x0_hat at t = "
              f"{', '.join(map(str, DENOISE_TIMESTEPS))}, same noise for both; a proxy for what it learned, "
              "not a generation: at these timesteps the denoiser mostly keeps the photo's identity, so the rows "
              "differ only by what each LoRA changed):"]
    for j in r.judges:
        lines += [f"  {j.name} ({j.role})"] + ["    " + format_scores(label, s) for label, s in j.denoise_rows.items()]
    lines.append(f"protected photos X' (PSNR {r.psnr:.1f} dB against X0), cosine to the reference photos' prototype:")
    lines += [f"  {j.name} ({j.role}): X0 {j.similarity_before:.3f} -> X' {j.similarity_after:.3f}" for j in r.judges]
    if len(r.judges) < len(DEMO_JUDGES):
        lines.append("held-out judge faceres is not installed (`iddm install-faceres`): only dlib, the attack's own "
                     "surrogate, scored this run")
    lines += [f"contact sheet: {r.sheet}", f"time: {r.seconds:.0f} s"]
    return "\n".join(lines)
