"""IDDMPortraits: portraits from any model the training node accepts, with a trained LoRA, as an IMAGE batch.

ComfyUI's Load Checkpoint cannot load the pack's demo model (SD1-shaped but far smaller, so ComfyUI's model
detection says "Could not detect model type"): with this node a user who trained on the demo entry still sees the
LoRA's portraits. It works on real checkpoints too, through iddm_core's own sampler (the stock KSampler workflow
stays the fast way to make pictures with them). Connect the train node's ``lora_name`` or pick a file. Module
level imports only the standard library.
"""
from __future__ import annotations

from .specs import CATEGORY

NO_LORA = "(none: the base model)"


class IDDMPortraits:
    DESCRIPTION = ("Samples portraits from a checkpoint (including the IDDM demo model, which Load Checkpoint "
                   "cannot load) with a LoRA from models/loras applied, e.g. the one IDDM Train LoRA just wrote. "
                   "Save them with Save Image (no metadata).")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The portraits, [count, H, W, 3], in memory (nothing is written by this node).",)

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_env import checkpoint_choices, lora_choices

        return {
            "required": {
                "ckpt_name": (checkpoint_choices(), {"tooltip": "The base checkpoint the LoRA was trained on (the "
                                                                "same list as IDDM Train LoRA, with the demo model)."}),
                "lora_name": ([NO_LORA] + lora_choices(), {"tooltip": "A LoRA from models/loras, or the lora_name "
                                                                      "output of IDDM Train LoRA."}),
                "prompt": ("STRING", {"default": "a photo of sks person", "multiline": True,
                                      "tooltip": "The prompt; IDDM's LoRAs learn the person as 'sks person'."}),
                "count": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "How many portraits."}),
                "sample_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                        "tooltip": "Seed of the sampler's noise (same seed, same portraits)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "DDIM sampling steps."}),
                "guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.5,
                                       "tooltip": "Classifier-free guidance scale."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, ckpt_name, lora_name, prompt, count, sample_seed, steps, guidance, unique_id=None):
        import torch

        from ..iddm_core.evaluation.portraits import check_sampling, portraits
        from .comfy_env import NodeProgress, lora_path
        from .session import training_model

        progress = NodeProgress(unique_id, int(count))
        progress.setup("check")                                          # the first event, before anything slow
        check_sampling(int(count), int(steps), float(guidance))          # before anything is unloaded or loaded
        lora = None if lora_name in (NO_LORA, "", None) else lora_path(str(lora_name))
        with torch.inference_mode(False), training_model(ckpt_name, precision="auto", callback=progress) as bundle:
            images = portraits(bundle, str(prompt), int(count), seed=int(sample_seed), steps=int(steps),
                               guidance=float(guidance), lora=lora, callback=progress)
        return (images.permute(0, 2, 3, 1).contiguous().float(),)
