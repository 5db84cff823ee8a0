"""What every front end does the same way: the ComfyUI nodes (``nodes/``) and the A1111/Forge tab (``scripts/``).

Plain functions over plain values (numbers, strings, the library's own config objects), so that each front end
only translates its widgets into arguments and never re-implements a rule: the LoRA file name check, the PGD
settings a preset fixes, the recogniser choice, the run's :class:`~iddm_core.protection.iddm.IDDMConfig`, and the texts shown
to the user (photo counts, the finished run's summary). Nothing here imports a host application or a UI toolkit,
and nothing here writes a file.

Privacy: the summaries carry numbers only, except :func:`refs_summary`, which names the photos left out (no face
found) for the user's own screen; front ends show it and never log or save it.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Iterable, Sequence

from .errors import InputError

LORA_SUFFIX = ".safetensors"
PRESET_CHOICES = ["privacy", "balanced", "fidelity", "fast", "custom"]
GRADIENT_CHOICES = ["full", "sds", "face", "fast"]
# How ComfyUI's summary names the place the LoRA went (``result_summary``'s ``where``).
COMFY_LORA_PLACE = "loras folder; refresh the LoRA list if it is not shown"


# ------------------------------------------------------------------------------------------------- names
def lora_file_name(lora_name: str) -> str:
    """"my_avatar" -> "my_avatar.safetensors"; a bare file name only (no folders, nothing outside the LoRA folder).

    A trailing ``.safetensors`` is accepted and not doubled. Anything that could leave the folder or hide the file
    (separators, drive colons, wildcards, a leading dot) is an :class:`InputError` naming the value."""
    name = (lora_name or "").strip()
    if name.lower().endswith(LORA_SUFFIX):
        name = name[: -len(LORA_SUFFIX)]
    if not name or name in (".", "..") or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise InputError(f"lora_name={lora_name!r}: give a plain file name (letters, digits, _ -), no folders")
    return name + LORA_SUFFIX


def lora_stem(file_name: str) -> str:
    """"my_avatar.safetensors" -> "my_avatar" (the name A1111/Forge prompts use: ``<lora:my_avatar:1>``)."""
    return file_name[: -len(LORA_SUFFIX)] if file_name.lower().endswith(LORA_SUFFIX) else file_name


def parse_file_list(text: str) -> list[str] | None:
    """"a.jpg, b.jpg" or one name per line -> ["a.jpg", "b.jpg"]; empty -> None (use the seeded split)."""
    names = [s.strip() for chunk in (text or "").splitlines() for s in chunk.split(",")]
    names = [s for s in names if s]
    return names or None


# ------------------------------------------------------------------------------------------------ numbers
# The range of every number a front end passes to pgd_config / iddm_config: (lowest, highest, whole number,
# what it is). The ComfyUI nodes' widgets have the same limits; a value typed outside them (a text box, an API
# call, a web UI slider's number box) is an error naming the parameter before anything starts, never clamped.
NUMBER_LIMITS = {
    "T": (1, 1000, True, "PGD steps per iteration (paper 8)"),
    "rho": (0.01, 0.99, False, "share of Stage I steps (0.1 = paper/privacy)"),
    "eta": (0.001, 1.0, False, "L-inf budget, pixels in [0, 1] (paper 0.08 = 20/255)"),
    "alpha": (0.0001, 1.0, False, "PGD step, at most eta (paper 0.008 = 2/255)"),
    "pgd_batch": (1, 64, True, "protected photos per PGD pass"),
    "K": (1, 1000, True, "outer iterations (paper 10)"),
    "ft_steps": (1, 100000, True, "fine-tune steps per burst"),
    "rank": (1, 256, True, "LoRA rank"),
    "conv_rank": (0, 256, True, "LoCon rank of the UNet's convolutions; 0 = off"),
    "lr": (1e-7, 0.1, False, "learning rate (default 1e-4)"),
    "resolution": (0, 2048, True, "training size in pixels, a multiple of 8; 0 = the model's own"),
    "seed": (0, 0xFFFFFFFF, True, "training seed"),
    "num_class_images": (1, 1000, True, "class images for prior preservation"),
    "tau": (0.001, 10.0, False, "softmax temperature (paper 0.03)"),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value, limits: tuple | None = None):
    """``value`` as an int (whole-number parameters) or float, if it lies in ``NUMBER_LIMITS[name]`` (or
    ``limits``); else an :class:`InputError` naming the parameter, the value and the range. Nothing is clamped or
    rounded: 5 for eta, 2.5 for K, an empty field or NaN are errors."""
    lo, hi, whole, what = limits or NUMBER_LIMITS[name]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name}={value!r}: give a number ({what})") from None
    if not _is_number(value) or not math.isfinite(value):          # None, NaN, inf, anything else
        raise InputError(f"{name}={value!r}: give a number ({what})")
    if whole and float(value) != int(value):
        raise InputError(f"{name}={value:g}: give a whole number from {lo:g} to {hi:g} ({what})")
    if not lo <= value <= hi:
        raise InputError(f"{name}={value:g} is out of range: give a number from {lo:g} to {hi:g} ({what})")
    return int(value) if whole else float(value)


# ------------------------------------------------------------------------------------------------ configs
def pgd_config(preset: str, T: int, rho: float, eta: float, alpha: float, gradient: str = "full",
               pgd_batch: int = 1):
    """:class:`~iddm_core.protection.pgd.PGDConfig` from a front end's fields: a preset other than "custom" fixes what it names
    (rho; "fast" also the gradient), the fields give the rest; every number is checked against
    :data:`NUMBER_LIMITS` (:func:`check_number`), so errors name the parameter and nothing is clamped."""
    from .protection.iddm import preset_values
    from .protection.pgd import PGDConfig

    if preset != "custom":              # the preset fixes rho (and "fast" the gradient): the rho field is unused
        values = {"gradient": str(gradient), **preset_values(preset)}
    else:
        values = {"rho": check_number("rho", rho), "gradient": str(gradient)}
    return PGDConfig(T=check_number("T", T), eta=check_number("eta", eta), alpha=check_number("alpha", alpha),
                     batch=check_number("pgd_batch", pgd_batch), **values).validate()


def pgd_settings_text(config, preset: str, rho: float, gradient: str) -> str:
    """The PGD settings in effect, with a note for each field the preset overrides (a named preset fixes rho, and
    'fast' the gradient, whatever those fields show)."""
    lines = [f"in effect: preset {preset}, rho {config.rho:g} (Stage I {config.n_rec} + Stage II {config.n_id} of "
             f"T={config.T} steps), gradient {config.gradient}, eta {config.eta:g}, alpha {config.alpha:g}, "
             f"pgd_batch {config.batch}"]
    if preset != "custom":
        if _is_number(rho) and abs(float(rho) - config.rho) > 1e-9:
            lines.append(f"note: the rho widget ({float(rho):g}) is not used: preset '{preset}' sets rho "
                         f"{config.rho:g}; choose preset 'custom' to use the widget")
        if str(gradient) != config.gradient:
            lines.append(f"note: the gradient widget ({gradient}) is not used: preset '{preset}' sets gradient "
                         f"{config.gradient}")
    return "\n".join(lines)


def selected_surrogates(specs: Sequence, chosen: Iterable[str], extra: str = "", field=lambda name: name) -> tuple:
    """Registry tokens for the chosen recognisers: "dlib" or "name:PATH" (the path found by discovery), in the
    registry's order, then the ``extra`` tokens ("name:PATH, ...").

    ``specs``: :func:`iddm_core.face.registry.discover`'s list; ``chosen``: registry names; ``field(name)``: how the
    front end calls the control of a recogniser in messages (ComfyUI: ``use_<name>``). A chosen recogniser that is
    not installed is an error that says which file to put where; choosing none is an error too."""
    chosen = set(chosen)
    tokens = []
    for spec in specs:
        if spec.name not in chosen:
            continue
        if not spec.available:
            raise InputError(f"{field(spec.name)}: recogniser {spec.name!r} is not installed; {spec.hint}")
        tokens.append(spec.name if spec.path is None else f"{spec.name}:{spec.path}")
    tokens += [t.strip() for t in (extra or "").split(",") if t.strip()]
    if not tokens:
        raise InputError("choose at least one face recogniser (dlib is always available)")
    return tuple(tokens)


def recogniser_status(specs: Sequence) -> str:
    """One line per recogniser: "installed", or what is missing and where to put it (the registry's hint)."""
    return "\n".join(f"{spec.name}: " + ("installed" if spec.available else f"not installed - {spec.hint}")
                     for spec in specs)


def iddm_config(pgd, K, ft_steps, rank, lr, resolution, seed, prior_preservation, num_class_images,
                train_text_encoder=False, *, surrogates, tau, conv_rank=0):  # 13: one per field
    """The run's :class:`~iddm_core.protection.iddm.IDDMConfig` from plain values, validated (errors name the parameter).

    ``pgd``: a :class:`~iddm_core.protection.pgd.PGDConfig` (see :func:`pgd_config`; copied, never shared with the caller);
    ``surrogates``: registry tokens (see :func:`selected_surrogates`); ``resolution`` 0 = the model's native size;
    ``conv_rank``: LoCon on the UNet's convolutions (alpha = conv_rank), 0 = off."""
    from .protection.iddm import IDDMConfig

    # class images are only made with prior preservation: without it the field is not used (nor checked)
    n_class = check_number("num_class_images", num_class_images) if prior_preservation else \
        NUMBER_LIMITS["num_class_images"][0]
    return IDDMConfig(K=check_number("K", K), pgd=dataclasses.replace(pgd), tau=check_number("tau", tau),
                      surrogates=tuple(surrogates), ft_steps=check_number("ft_steps", ft_steps),
                      rank=check_number("rank", rank), lr=check_number("lr", lr),
                      resolution=check_number("resolution", resolution) or None, seed=check_number("seed", seed),
                      prior_preservation=bool(prior_preservation), num_class_images=n_class,
                      train_text_encoder=bool(train_text_encoder),
                      conv_rank=check_number("conv_rank", conv_rank)).validate()


# ------------------------------------------------------------------------------------------------- model
@contextmanager
def loaded_for_training(path: str, device, info=None, precision: str = "auto", tokenizer=None, callback=None):
    """Yield a :class:`~iddm_core.diffusion.bundle.ModelBundle` of ``path`` on ``device`` for one run, and drop its weights
    after it, whether the run finished, failed or was cancelled.

    Call it after the host application has freed its own models. The frozen weights are stored as the precision
    policy says (``Runtime.weight_dtypes``: bf16/fp16 UNet and text encoders on a GPU); with ``info``
    (``validation.validate_model``'s answer) a model whose weights cannot fit the memory left is refused before
    loading. ``tokenizer``: a CLIP tokenizer folder for a single-file checkpoint (see ``loading.load_model``).
    ``callback(Event)``: the run's progress callback; it gets ``"setup"`` events while the model loads (between its
    parts) and may raise there to cancel, as during training."""
    from .events import report_setup
    from .diffusion.fit import check_model_fits
    from .diffusion.loading import load_model
    from .diffusion.runtime import Runtime

    report_setup(callback, "load", "loading the model: checking the memory")
    runtime = Runtime.decide(device, precision)
    if info is not None:
        check_model_fits(info, runtime)
    bundle = load_model(path, tokenizer=tokenizer, device=device, weight_dtypes=runtime.weight_dtypes,
                        callback=callback)
    try:
        yield bundle
    finally:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            setattr(bundle, name, None)
        del bundle


# -------------------------------------------------------------------------------------------------- texts
def refs_summary(refs, show_names: bool = True) -> str:
    """Counts, and which photos were left out (no face found) so the user can fix the folder.

    For the user's screen only (a node's text, the tab's preview): never written into a LoRA, a report or a log.
    ``show_names=False`` names a left-out photo by its position in the folder (sorted by file name) instead of its
    file name: for hosts that keep what a node shows (ComfyUI stores every node's text and outputs in /history)."""
    n_ref, n_prot = len(refs.split.reference), len(refs.split.protect)
    lines = [f"{len(refs)} photos with a face at {refs.resolution}px: {n_ref} reference (Xc), {n_prot} protected (X0)"]
    from .protection.refs import folder_positions, identity_note

    if refs.skipped:
        if show_names:
            which = ", ".join(refs.skipped)
        else:
            positions, total = folder_positions(refs, refs.skipped)
            which = f"{positions} of the folder's {total} photos, sorted by file name"
        lines.append(f"{len(refs.skipped)} photo(s) without a detectable face were skipped: {which}")
    note = identity_note(refs, show_names)       # refs.identity: set by refs.check_identity, when it was run
    if note:
        lines.append(note)
    return "\n".join(lines)


def result_summary(file_name: str, report: dict, where: str = COMFY_LORA_PLACE) -> str:
    """Numbers only (no photo names): what was trained and how recognisable the protected photos still are.

    ``where``: how this front end names the folder the LoRA went to and how to make it appear in its list (the
    first line reads "LoRA written: <file> (<where>)")."""
    cfg = report.get("config", {})
    pgd = cfg.get("pgd", {})
    lines = [f"LoRA written: {file_name} ({where})",
             f"K={cfg.get('K')} T={pgd.get('T')} rho={pgd.get('rho')} eta={pgd.get('eta')} ft_steps={cfg.get('ft_steps')} "
             f"rank={cfg.get('rank')} at {report.get('resolution')}px, "
             f"{report.get('n_reference')} reference + {report.get('n_protect')} protected photos"]
    sims = report.get("final_similarity") or {}
    if sims:      # iddm_report.final_similarity: the recognisers on X' itself; the PGD steps' numbers are on x0_hat
        lines.append("face similarity of the protected photos X' after the last iteration (mean cosine similarity "
                     "to your clean reference photos, per attacked recogniser; lower = harder to link to you): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sims.items()))
        lines.append("  (the similarity shown at each PGD step is of the model's one-step denoised reconstruction "
                     "of the photos, before that step, so it differs)")
    sched = report.get("schedule") or {}
    if sched:
        lines.append(f"PGD per iteration: {sched.get('stage1_steps')} Stage I + {sched.get('stage2_steps')} Stage II "
                     "steps" + (f" - {sched['note']}: every PGD step attacks identity" if sched.get("note") else ""))
    if cfg.get("train_text_encoder"):
        lines.append("text encoder trained too (LoRA); PGD conditioned on the trained text encoder")
    resume = report.get("resume") or {}
    if resume.get("resumed_after"):
        lines.append(f"resumed after iteration {resume['resumed_after']} of {cfg.get('K')} (interrupted run, same "
                     "model, photos and settings)")
    if resume.get("discarded"):
        lines.append(f"a saved resume state for this LoRA name was from a different run ({resume['discarded']}): "
                     "discarded, started over")
    t = report.get("timings") or {}
    if t:
        lines.append(f"time {t.get('total', 0):.1f}s (fine-tune {t.get('finetune', 0):.1f}s, PGD {t.get('pgd', 0):.1f}s)")
    return "\n".join(lines)
