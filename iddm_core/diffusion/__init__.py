"""Diffusion models: loading and writing checkpoints (SD 1/2, SDXL, the pack's demo and tiny models), the original
key layout, and how a run uses the hardware (precision, activation checkpointing, the memory fit check).

Importing this package imports nothing; each module is imported where it is used. Where things live:

    loading.py           load_model (the one entry point: built-in name, diffusers folder or single file),
                         load_demo_bundle / load_demo_v2_bundle
    validation.py        validate_model -> ModelInfo: will it load? checked without loading it (before long work)
    bundle.py            ModelBundle (what every later step works on) and the config helpers that fill it
    kinds.py             KINDS, SDXL_KINDS, PREDICTION_TYPES, ZERO_TERMINAL_SNR, detect_kind (sd1/sd2/sd2v/sdxl/sdxl-v)
    reading.py           read_checkpoint / read_checkpoint_header (single files, no network built), shipped_configs
    tokenizers.py        resolve_tokenizer(_2), check_tokenizer_fits, ComfyUI's bundled tokenizer
    single_file.py       load_single_file: original-layout .safetensors / weights-only pickles -> ModelBundle
    diffusers_folder.py  load_diffusers: diffusers folders -> ModelBundle
    writing.py           save_single_file, save_diffusers, bundle_to_original
    builtin.py           where the shipped demo models lie (asset folders, weights, tokenizer, titles)
    tiny.py              the tiny random model (build_tiny_bundle, write_tiny_model)
    sd_keys.py           diffusers <-> original SD key layout
    configs/             the architecture JSONs per kind for files that carry none
    precision.py, grad_checkpoint.py, fit.py, runtime.py   how a run uses the hardware
"""
