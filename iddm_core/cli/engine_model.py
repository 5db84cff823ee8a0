"""``tiny-model DIR``: write the built-in tiny SD model to disk, as a diffusers folder and a single file.

Useful to try the file loaders, the ComfyUI nodes or the CLI end to end on a machine without real SD weights.
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tiny-model", help="write the tiny test model (diffusers folder + original-layout .safetensors)",
        description="Write DIR/tiny (diffusers folder, with tokenizer) and DIR/tiny.safetensors (original SD "
                    "key layout; its tiny tokenizer is built in, so it loads and trains with no --tokenizer, in "
                    "ComfyUI too).")
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0, as load_model('tiny'))")
    p.add_argument("--kind", choices=["sd1", "sdxl"], default="sd1",
                   help="sd1 (default): DIR/tiny + DIR/tiny.safetensors; sdxl: the tiny SDXL-shaped model as "
                        "DIR/tiny-sdxl + DIR/tiny-sdxl.safetensors (loads and trains like the SD1 one)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..diffusion.tiny import write_tiny_model

    folder, single = write_tiny_model(args.dir, seed=args.seed, kind=args.kind)
    print(f"diffusers folder: {folder}")
    print(f"single file:      {single} (its tiny tokenizer is built in: no --tokenizer needed)")
    return 0
