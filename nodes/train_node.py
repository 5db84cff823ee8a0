"""IDDMTrainLoRA: run IDDM (Algorithm 1) and write a kohya LoRA into ComfyUI's loras folder.

The node returns the LoRA's file name as a combo-compatible value, so it can be wired into the stock
LoraLoader's ``lora_name``. Progress goes three ways: ComfyUI's progress bar, Cancel (checked after every
step; iddm_core then writes nothing), and ``iddm.progress`` websocket events drawn as a chart by web/iddm.js.

Resume (``resume``, on by default): the run's state is saved after every finished iteration in a private folder
(:func:`comfy_env.state_root`, one per LoRA file name, 0700/0600) and deleted when the run finishes. Queued again after a
Cancel or a crash, the node continues from that iteration if the base model, photos, split, class images and
settings are the same; if anything differs it deletes the old state and starts over, saying so in the summary
(an error would make the user hunt for a hidden folder; the CLI, where the user asked for --resume, refuses).
"""
from __future__ import annotations

from pathlib import Path

# Shared with the A1111/Forge tab (scripts/): the name check, the config and the summary live in one place.
from ..iddm_core.frontend import LORA_SUFFIX, iddm_config, lora_file_name, result_summary  # noqa: F401
from .specs import CATEGORY, LOSS, PGD, REFS, ComboName


def train_state_dir(out_path) -> Path:
    """The resume-state folder of the run writing ``out_path`` (one per LoRA file)."""
    from ..iddm_core.training.checkpoint import state_dir_for

    from .comfy_env import state_root

    return state_dir_for(out_path, root=state_root(), namespace="comfyui")


class IDDMTrainLoRA:
    DESCRIPTION = ("Trains a personal LoRA with IDDM: alternates DreamBooth-LoRA fine-tuning and two-stage PGD on "
                   "your protected photos, so portraits made with the LoRA are hard to link to you by face "
                   "recognition. Writes a kohya LoRA into models/loras.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (ComboName("COMBO"), "STRING")
    RETURN_NAMES = ("lora_name", "summary")
    OUTPUT_TOOLTIPS = ("File name of the new LoRA in the loras folder: connect to LoraLoader's lora_name.",
                       "What was trained, final similarities and timings (no photo names).")

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_env import checkpoint_choices

        return {
            "required": {
                "ckpt_name": (checkpoint_choices(), {"tooltip": "Base checkpoint: SD 1.x/2.x or SDXL and its "
                                                                "descendants (Pony, Illustrious, NoobAI), from "
                                                                "models/checkpoints, or a diffusers folder (models/diffusers)."}),
                "refs": (REFS, {"tooltip": "Your photos, from Load Private Refs."}),
                "loss": (LOSS, {"tooltip": "Face recognisers to attack, from Face Ensemble Loss."}),
                "pgd": (PGD, {"tooltip": "PGD settings, from PGD Two-Stage."}),
                "K": ("INT", {"default": 10, "min": 1, "max": 1000,
                              "tooltip": "Outer IDDM iterations (paper 10)."}),
                "ft_steps": ("INT", {"default": 40, "min": 1, "max": 100000,
                                     "tooltip": "DreamBooth-LoRA steps per fine-tune burst (2 bursts per iteration)."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (alpha = rank)."}),
                "lr": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-1, "step": 1e-5, "round": 1e-7,
                                 "tooltip": "Learning rate of the LoRA (AdamW)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                       "tooltip": "Training size in pixels; 0 = the model's native resolution "
                                                  "(512 SD1/SD2-base, 768 SD2-v, 1024 SDXL). A lower size "
                                                  "trains faster in less memory (SDXL at 512-768 is common)."}),
                "train_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                       "tooltip": "Seed for noise, timesteps and LoRA initialisation (fixed: "
                                                  "a new seed would retrain)."}),
                "lora_name": ("STRING", {"default": "iddm_lora", "multiline": False,
                                         "tooltip": "File name of the LoRA written to models/loras "
                                                    "(.safetensors is added)."}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "Replace an existing LoRA of the same name; off = stop before "
                                                     "training if it exists."}),
                "prior_preservation": ("BOOLEAN", {"default": True,
                                                   "tooltip": "DreamBooth prior preservation with class images made "
                                                              "once by the base model (cached in ComfyUI's temp)."}),
                "num_class_images": ("INT", {"default": 8, "min": 1, "max": 1000,
                                             "tooltip": "How many class images prior preservation generates."}),
            },
            # Added later, so optional and at the END: UI-format workflows store widget values by position, and
            # API-format ones saved before them stay valid (see FIRST_TOGGLES in loss_node.py).
            "optional": {
                "resume": ("BOOLEAN", {"default": True,
                                       "tooltip": "Continue a cancelled or crashed run of this LoRA name from its "
                                                  "last finished iteration when queued again with the same model, "
                                                  "photos and settings (anything changed: starts over). The state "
                                                  "is kept privately under ComfyUI's user folder and deleted when "
                                                  "the run finishes. Off: always start over, save no state."}),
                "train_text_encoder": ("BOOLEAN", {"default": False,
                                                   "tooltip": "Also train a LoRA on the CLIP text encoder (the "
                                                              "paper fine-tunes UNet and text encoder); PGD then "
                                                              "conditions on the trained text encoder. Bigger "
                                                              "LoRA, slower."}),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 256,
                                      "tooltip": "LoCon: also train LoRA on the UNet's ResBlock and down/upsampler "
                                                 "convolutions with this rank (kohya conv_dim, alpha = this rank); "
                                                 "0 = off (attention only, the default). A bigger LoRA; "
                                                 "try a lower lr with it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, refs, loss, pgd, K, ft_steps, rank, lr, resolution, train_seed, lora_name, overwrite,
              prior_preservation=True, num_class_images=8, resume=True, train_text_encoder=False, conv_rank=0,
              unique_id=None):   # 18 parameters: one per node input
        import torch

        from ..iddm_core.atomic import check_writable
        from ..iddm_core.training.checkpoint import clear_state
        from ..iddm_core.protection.iddm import run_iddm, total_steps
        from ..iddm_core.diffusion.validation import validate_model
        from .comfy_env import NodeProgress, class_cache_dir, loras_dir, resolve_checkpoint
        from .session import trainable_refs, training_model

        config = iddm_config(pgd, K, ft_steps, rank, lr, resolution, train_seed, prior_preservation, num_class_images,
                             train_text_encoder, surrogates=loss.surrogates, tau=loss.tau, conv_rank=conv_rank)
        # The chart shows each setup step from the first second on, and Cancel works during all of them (the
        # callback checks ComfyUI's interrupt flag): model checks, loading, class images, trial steps.
        progress = NodeProgress(unique_id, total_steps(config))
        progress.setup("check")
        file_name = lora_file_name(lora_name)
        out_path = loras_dir() / file_name
        check_writable(out_path, bool(overwrite))          # before loading anything
        state_dir = train_state_dir(out_path)
        if not resume:
            clear_state(state_dir)                         # an old state of this LoRA name is not kept around
        # The checkpoint (kind, tokenizer) and the photos are checked before ComfyUI's models are unloaded and
        # before any training: a wrong file fails in seconds, not after the run.
        info = validate_model(resolve_checkpoint(ckpt_name))
        photos = refs.at(config.resolution or info.resolution)
        with torch.inference_mode(False), training_model(ckpt_name, info, config.mixed_precision,
                                                         callback=progress) as bundle:
            prepared = trainable_refs(photos)
            result = run_iddm(bundle, prepared, config, out_path=out_path, lora_name=file_name[: -len(LORA_SUFFIX)],
                              overwrite=bool(overwrite), callback=progress, class_cache_dir=class_cache_dir(),
                              checkpoint_dir=state_dir if resume else None, resume=bool(resume),
                              on_mismatch="restart", model_source=resolve_checkpoint(ckpt_name))
        summary = result_summary(file_name, result.report)
        return {"ui": {"text": [summary]}, "result": (file_name, summary)}
