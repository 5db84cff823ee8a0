"""ProtectPhotos: anti-personalisation of photos before posting them (Anti-DreamBooth ASPL / FSMG, optionally + CAP).

IMAGE batch in, IMAGE batch out (centre square crop at the model's resolution, on the 8-bit grid, within eta of the
input after saving). Save the result with "Save Image (no metadata)" (save_node.py): ComfyUI's own Save Image
would embed the workflow. The heavy work is iddm_core/protection/protect.py; module level imports only the standard library.

Resume (``resume``, on by default), as the training node does: the state of the last finished round is kept in a
private folder (:func:`comfy_env.state_root`, named by a hash of the input photos' pixels) and deleted when the run
finishes. Queued again after a Cancel or a crash with the same photos, the node continues from that round if the
model and settings are the same, and otherwise deletes the old state and starts over, saying so in the summary.
"""
from __future__ import annotations

from .specs import CATEGORY


def images_to_tensor(images, resolution: int):
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [B, 3, r, r]: centre square crop, resized to ``resolution``,
    rounded to the 8-bit grid (what a saved PNG of the input holds)."""
    import torch
    import torch.nn.functional as F

    from ..iddm_core.errors import InputError

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise InputError("images: expected an IMAGE batch [B, H, W, 3]")
    x = images[..., :3].detach().float().clone().permute(0, 3, 1, 2).clamp(0, 1)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top:top + side, left:left + side]
    if side != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).mul(255).round().div(255)


def protect_state_dir(x):
    """The resume-state folder of a protect run on the photos ``x`` (a [N, 3, H, W] tensor on the 8-bit grid)."""
    import hashlib

    import torch

    from ..iddm_core.training.checkpoint import state_dir_keyed
    from .comfy_env import state_root

    pixels = x.mul(255).round().to(torch.uint8).cpu().numpy()
    key = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return state_dir_keyed(key, root=state_root(), namespace="comfyui-protect")


def summary_text(report: dict) -> str:
    """What was done and measured, numbers only (no names, no paths)."""
    cfg = report["config"]
    lines = []
    resume = report.get("resume", {})
    if resume.get("resumed_after"):
        lines.append(f"resumed after round {resume['resumed_after']} of {cfg['rounds']} (interrupted run, same "
                     "photos, model and settings)")
    if resume.get("discarded"):
        lines.append(f"an interrupted run's state was discarded and this run started over: {resume['discarded']}")
    lines += [f"{report['method']}{' + CAP' if report['cap'] else ''}: {report['n_photos']} photo(s) at "
             f"{report['resolution']}px, eta {cfg['eta']:g}, alpha {cfg['alpha']:g}, {cfg['rounds']} rounds x "
             f"{cfg['pgd_steps']} PGD steps",
             f"max |delta| after 8-bit rounding: {report['linf_8bit']}/255"]
    d = report.get("denoising_loss", {})
    for which in ("surrogate", "base"):
        if which in d:
            lines.append(f"denoising loss ({which}): clean {d[which]['clean']:.4f} -> protected "
                         f"{d[which]['protected']:.4f}")
    if "style_spread" in report:
        s = report["style_spread"]
        lines.append(f"Gram spread ({report['features']}): {s['clean']:.4g} -> {s['protected']:.4g}")
    lines.append("save with 'Save Image (no metadata)' to post")
    return "\n".join(lines)


class ProtectPhotos:
    DESCRIPTION = ("Protect photos you post: adds a small perturbation (at most eta per pixel) that makes "
                   "DreamBooth fine-tuning on them learn a damaged concept (Anti-DreamBooth's ASPL or FSMG, "
                   "optionally with CAP's cross-image style consistency). Save the result with 'Save Image (no "
                   "metadata)'.")
    CATEGORY = CATEGORY
    FUNCTION = "protect"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("protected", "summary")
    OUTPUT_TOOLTIPS = ("The protected photos: square, at the model's resolution (or 'resolution'), within eta of "
                       "the input after 8-bit saving.",
                       "What was done and measured: budget used, denoising loss clean -> protected.")

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_env import checkpoint_choices

        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The photos to protect (e.g. from Load Image); centre square crop."}),
                "ckpt_name": (checkpoint_choices(), {"tooltip": "Model to attack as the surrogate: the model family "
                                                                "people would DreamBooth your photos on (SD 1.x/2.x)."}),
                "method": (["aspl", "fsmg"], {"default": "aspl",
                                              "tooltip": "aspl: the surrogate is re-trained every round (stronger); "
                                                         "fsmg: trained once on the clean photos (faster)."}),
                "cap": ("BOOLEAN", {"default": False,
                                    "tooltip": "Add CAP's style-consistency loss with its dynamic ratio search "
                                               "(needs 2+ photos)."}),
                "eta": ("FLOAT", {"default": 0.05, "min": 0.001, "max": 0.5, "step": 0.001,
                                  "tooltip": "Largest change per pixel, in [0,1] (Anti-DreamBooth 0.05 = 12.75/255)."}),
                "alpha": ("FLOAT", {"default": 0.005, "min": 0.0001, "max": 0.5, "step": 0.0001,
                                    "tooltip": "PGD step size, at most eta (Anti-DreamBooth 0.005)."}),
                "rounds": ("INT", {"default": 50, "min": 1, "max": 1000,
                                   "tooltip": "Rounds of surrogate training + PGD (Anti-DreamBooth 50)."}),
                "surrogate_steps": ("INT", {"default": 3, "min": 0, "max": 1000,
                                            "tooltip": "DreamBooth-LoRA steps of the surrogate per round (3)."}),
                "pgd_steps": ("INT", {"default": 6, "min": 1, "max": 1000,
                                      "tooltip": "PGD steps per round (6)."}),
                # not named "seed": ComfyUI's frontend would re-randomise it after every queue, so a run queued
                # again after Cancel would never resume
                "protect_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                         "tooltip": "Seed of the diffusion noise and the surrogate's training."}),
            },
            "optional": {
                "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                       "tooltip": "Size in pixels; 0 = the model's native size."}),
                "prior_preservation": ("BOOLEAN", {"default": True,
                                                   "tooltip": "Train the surrogate with class images generated by "
                                                              "the model (as DreamBooth does); off is faster."}),
                "ratio_max": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.05,
                                        "tooltip": "CAP: largest ratio tried; 1 weighs the style gradient like the "
                                                   "reconstruction gradient."}),
                "ratio_steps": ("INT", {"default": 5, "min": 1, "max": 21,
                                        "tooltip": "CAP: ratios tried per step, 0..ratio_max; 1 = the static ratio "
                                                   "ratio_max."}),
                "pgd_batch": ("INT", {"default": 1, "min": 1, "max": 64,
                                      "tooltip": "Photos per PGD pass: 1 = least GPU memory; the result is the same."}),
                "resume": ("BOOLEAN", {"default": True,
                                       "tooltip": "Continue an interrupted run on the same photos (state kept "
                                                  "privately after every round, deleted when done); off starts "
                                                  "over."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # 17 parameters: one per node input (ComfyUI calls FUNCTION with every widget and link by name).
    def protect(self, images, ckpt_name, method, cap, eta, alpha, rounds, surrogate_steps, pgd_steps, protect_seed,
                resolution=0, prior_preservation=True, ratio_max=1.0, ratio_steps=5, pgd_batch=1, resume=True,
                unique_id=None):
        import torch

        from ..iddm_core.training.checkpoint import clear_state
        from ..iddm_core.diffusion.validation import validate_model
        from ..iddm_core.protection.protect import ProtectConfig, run_protect
        from .comfy_env import NodeProgress, resolve_checkpoint
        from .session import training_model

        config = ProtectConfig(method=method, cap=bool(cap), eta=float(eta), alpha=float(alpha), rounds=int(rounds),
                               surrogate_steps=int(surrogate_steps), pgd_steps=int(pgd_steps), seed=int(protect_seed),
                               resolution=int(resolution) or None, prior_preservation=bool(prior_preservation),
                               ratio_max=float(ratio_max), ratio_steps=int(ratio_steps), batch=int(pgd_batch),
                               num_class_images=8).validate()
        progress = NodeProgress(unique_id, config.total_events())
        progress.setup("check")             # at once: the chart shows each setup step, Cancel works in all of them
        if config.cap and images.shape[0] < 2:
            from ..iddm_core.errors import InputError

            raise InputError("cap needs at least 2 photos in the images batch")
        info = validate_model(resolve_checkpoint(ckpt_name))
        size = config.resolution or info.resolution
        with torch.inference_mode(False):
            x = images_to_tensor(images, size)
            state_dir = protect_state_dir(x)
            if not resume:
                clear_state(state_dir)                     # an old state of these photos is not kept around
            with training_model(ckpt_name, info, config.mixed_precision, callback=progress) as bundle:
                result = run_protect(bundle, x, config, callback=progress, model_source=resolve_checkpoint(ckpt_name),
                                     checkpoint_dir=state_dir if resume else None, resume=bool(resume),
                                     on_mismatch="restart")
            out = result.protected.permute(0, 2, 3, 1).contiguous().cpu()
        text = summary_text(result.report)
        return {"ui": {"text": [text]}, "result": (out, text)}
