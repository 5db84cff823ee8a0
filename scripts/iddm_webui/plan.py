"""Step 1 of a Train click: everything checked before the web UI's model is touched (:func:`plan_run`): the
settings by ``iddm_core.frontend``'s rules, the LoRA file, the checkpoint without loading it, the photos."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import webui
from .photos import prepare_refs


@dataclass
class Plan:
    """Everything checked before the web UI's model is touched."""

    config: Any
    file_name: str
    out_path: Path
    model_path: str
    tokenizer: str | None
    info: Any
    refs: Any
    state_dir: Path
    overwrite: bool
    resume: bool
    notes: list = field(default_factory=list)


def check_model(request):
    """(path, tokenizer folder or None, ModelInfo) of the chosen checkpoint, checked without loading it."""
    from iddm_core.errors import ModelError

    path = webui.resolve_checkpoint(request.checkpoint)
    tokenizer = None
    if Path(path).is_file():                 # single files carry no tokenizer; folders and "demo" bring theirs
        tokenizer = webui.tokenizer_dir(request.tokenizer)
        if tokenizer is None:
            raise ModelError(f"base model: no CLIP tokenizer found for {Path(path).name} (a single-file checkpoint "
                             f"has none): {webui.webui_name()} downloads {webui.HF_TOKENIZER_REPO} into the Hugging "
                             "Face cache the first time it loads an SD 1.x or SDXL model (generate one image, then "
                             "train); or put vocab.json and merges.txt of that tokenizer in a folder and give it "
                             "under Advanced: CLIP tokenizer folder")
    import_model_modules()
    from iddm_core.diffusion.validation import validate_model

    return path, tokenizer, validate_model(path, tokenizer=tokenizer)


def import_model_modules() -> None:
    """Import iddm_core's model modules with the web UI's environment kept as it was: importing them sets the HF
    offline variables (iddm_core.offline), which a web UI restart would otherwise inherit."""
    with webui.keep_host_environment():
        import iddm_core.demo.model.architecture  # noqa: F401
        import iddm_core.diffusion.loading  # noqa: F401
        import iddm_core.diffusion.validation  # noqa: F401
        import iddm_core.diffusion.tiny  # noqa: F401


def plan_run(request) -> Plan:
    """The checked :class:`Plan` of a :class:`~.request.TrainRequest`; any error names the setting or file."""
    from iddm_core import frontend
    from iddm_core.atomic import check_writable
    from iddm_core.training.checkpoint import clear_state, state_dir_for
    from iddm_core.face.registry import discover

    pgd = frontend.pgd_config(request.preset, request.T, request.rho, request.eta, request.alpha, request.gradient,
                              request.pgd_batch)
    tokens = frontend.selected_surrogates(discover(webui.recogniser_search_dirs()), request.surrogates or (),
                                          request.extra_surrogates, field=lambda name: f"surrogates: {name}")
    config = frontend.iddm_config(pgd, request.K, request.ft_steps, request.rank, request.lr, request.resolution,
                                  request.seed, request.prior_preservation, request.num_class_images,
                                  request.train_text_encoder, surrogates=tokens, tau=request.tau,
                                  conv_rank=request.conv_rank)
    file_name = frontend.lora_file_name(request.lora_name)
    out_path = webui.lora_dir() / file_name
    check_writable(out_path, bool(request.overwrite))          # before any slow work
    model_path, tokenizer, info = check_model(request)
    refs = prepare_refs(request, config.resolution or info.resolution)
    state_dir = state_dir_for(out_path, namespace="a1111")
    if not request.resume:
        clear_state(state_dir)
    notes = [frontend.pgd_settings_text(pgd, request.preset, request.rho, request.gradient)]
    from iddm_core.protection.refs import identity_note

    if identity_note(refs):                # the photos text says it too; the status line is what users read first
        notes.append(identity_note(refs))
    return Plan(config, file_name, out_path, model_path, tokenizer, info, refs, state_dir, bool(request.overwrite),
                bool(request.resume), notes)
