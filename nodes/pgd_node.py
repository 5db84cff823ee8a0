"""PGDTwoStage: the PGD numbers (T, rho, eta, alpha) -> IDDM_PGD, with an optional one-shot preview.

The preview attacks the protected photos once against the *base* model (no fine-tuning), so a user can see
the size of the perturbation and how far the recognisers' similarity falls before spending an hour training.
"""
from __future__ import annotations

from .specs import CATEGORY, LOSS, PGD, REFS

# The rules shared with the A1111/Forge tab live in iddm_core.frontend (one place); the names stay importable here.
from ..iddm_core.frontend import GRADIENT_CHOICES, PRESET_CHOICES, pgd_config  # noqa: E402,F401
from ..iddm_core.frontend import pgd_settings_text as settings_text  # noqa: E402,F401

NO_PREVIEW = "(none)"


def similarity_drop_text(before: dict, after: dict, linf: float) -> str:
    """"dlib: 0.912 -> 0.640 (-0.272)" per recogniser: mean cosine similarity to the reference prototype."""
    lines = [f"{name}: {before[name]:.3f} -> {after[name]:.3f} ({after[name] - before[name]:+.3f})" for name in before]
    lines.append(f"max |delta| = {linf:.4f} ({linf * 255:.1f}/255)")
    return "\n".join(lines)


def _mean_sims(ensemble, images, landmarks) -> dict:
    import torch

    with torch.no_grad():
        _, sims = ensemble(images, landmarks)
    return {name: float(s.float().mean()) for name, s in sims.items()}


def run_preview(handle, loss, config, ckpt_name: str, resolution: int, seed: int, node_id=None):
    """X' of the protected photos after one PGDTwoStage against the base model, and the similarity drop."""
    import torch

    from ..iddm_core.training.conditioning import encode_prompts
    from ..iddm_core.training.finetune import FinetuneConfig
    from ..iddm_core.protection.pgd import pgd_two_stage
    from ..iddm_core.diffusion.runtime import Runtime
    from .comfy_env import NodeProgress
    from .session import trainable_refs, training_model

    progress = NodeProgress(node_id, config.T)
    with torch.inference_mode(False), training_model(ckpt_name) as bundle:
        device = bundle.device
        refs = trainable_refs(handle.at(int(resolution) or bundle.resolution))
        x_ref, lm_ref = (t.to(device) for t in refs.reference())
        x0, lm0 = (t.to(device) for t in refs.protect())
        ensemble = loss.build(device)
        ensemble.set_references(x_ref, lm_ref)
        with torch.no_grad():
            embeds = encode_prompts(bundle, [FinetuneConfig().instance_prompt]).detach()
        before = _mean_sims(ensemble, x0, lm0)

        def on_step(record):
            from ..iddm_core.events import Event

            progress(Event(phase="pgd", done=record["t"], total=config.T, t=record["t"], stage=record["stage"],
                           loss=record["loss"], similarity=record["similarity"], linf=record["linf"]))

        generator = torch.Generator().manual_seed(int(seed))
        x_adv = pgd_two_stage(bundle, ensemble, x0, lm0, embeds, config, generator, on_step=on_step,
                              runtime=Runtime.decide(device))
        after = _mean_sims(ensemble, x_adv, lm0)
        linf = float((x_adv - x0).abs().max())
        image = x_adv.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()
    return image, similarity_drop_text(before, after, linf)


class IDDMPGDTwoStage:
    DESCRIPTION = ("Two-stage sign-PGD settings. Stage I (first floor(rho*T) steps) keeps the photos easy to "
                   "learn; Stage II pushes the face recognisers' similarity down. Optionally previews the attack "
                   "on the protected photos against a base checkpoint.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (PGD, "IMAGE", "STRING")
    RETURN_NAMES = ("pgd", "protected_preview", "similarity_drop")
    OUTPUT_TOOLTIPS = ("PGD settings for IDDM Train LoRA.",
                       "Preview only: the protected photos X' after one PGD run on the base model.",
                       "With a preview: per recogniser, mean similarity to your references before -> after; "
                       "always: the settings in effect (a named preset overrides the rho widget).")

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_env import checkpoint_choices

        return {
            "required": {
                "preset": (PRESET_CHOICES, {"default": "privacy",
                                            "tooltip": "Sets rho: privacy 0.1, balanced 0.3, fidelity 0.5; fast = "
                                                       "rho 0.3 with the 'fast' gradient; 'custom' uses the rho "
                                                       "below."}),
                "T": ("INT", {"default": 8, "min": 1, "max": 1000,
                              "tooltip": "PGD steps per outer iteration (paper 8)."}),
                "rho": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 0.99, "step": 0.01,
                                  "tooltip": "Share of Stage I (fidelity) steps; smaller = more privacy. "
                                             "Used only with preset 'custom': any other preset sets its own "
                                             "rho (see preset), and the node's text says which value is in "
                                             "effect."}),
                "eta": ("FLOAT", {"default": 0.08, "min": 0.001, "max": 1.0, "step": 0.001,
                                  "tooltip": "L-inf budget of the perturbation, pixels in [0,1] (paper 0.08 "
                                             "= 20/255)."}),
                "alpha": ("FLOAT", {"default": 0.008, "min": 0.0001, "max": 1.0, "step": 0.0001,
                                    "tooltip": "PGD step size, at most eta (paper 0.008 = 2/255)."}),
            },
            "optional": {
                "refs": (REFS, {"tooltip": "Optional, for the preview: photos from Load Private Refs."}),
                "loss": (LOSS, {"tooltip": "Optional, for the preview: recognisers from Face Ensemble Loss "
                                           "(default dlib)."}),
                "preview_ckpt": ([NO_PREVIEW] + checkpoint_choices(),
                                 {"default": NO_PREVIEW,
                                  "tooltip": "Base model for the preview; '(none)' = no preview (fast)."}),
                "preview_resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                               "tooltip": "Preview size in pixels; 0 = the model's native size."}),
                "preview_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                         "tooltip": "Seed of the diffusion noise used by the preview."}),
                "gradient": (GRADIENT_CHOICES, {"default": "full",
                                                "tooltip": "full = the paper's gradient; sds skips the UNet's "
                                                           "backward pass; face runs Stage II on a window around "
                                                           "the face; fast = face + sds (the 'fast' preset sets "
                                                           "it)."}),
                "pgd_batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                      "tooltip": "Protected photos per PGD pass: 1 = least GPU memory; higher is "
                                                 "faster if it fits. The result is the same."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # 13 parameters: one per node input (ComfyUI calls FUNCTION with every widget and link by name).
    def build(self, preset, T, rho, eta, alpha, refs=None, loss=None, preview_ckpt=NO_PREVIEW,
              preview_resolution=0, preview_seed=0, gradient="full", pgd_batch=1, unique_id=None):
        import torch

        config = pgd_config(preset, T, rho, eta, alpha, gradient, pgd_batch)
        settings = settings_text(config, preset, rho, gradient)
        if refs is None or not preview_ckpt or preview_ckpt == NO_PREVIEW:
            text = "no preview (connect refs and choose preview_ckpt)\n" + settings
            return {"ui": {"text": [text]}, "result": (config, torch.zeros(1, 64, 64, 3), text)}
        if loss is None:
            from .specs import LossSpec

            loss = LossSpec(surrogates=("dlib",))
        image, drop = run_preview(refs, loss, config, preview_ckpt, preview_resolution, preview_seed, unique_id)
        text = drop + "\n" + settings
        return {"ui": {"text": [text]}, "result": (config, image, text)}
