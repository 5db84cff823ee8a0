"""The "IDDM" tab's gradio layout; the only module of the extension that imports gradio.

Written against what gradio 3.41 (AUTOMATIC1111) and gradio 4 (Forge) both have: Blocks, Row/Column/Accordion,
Textbox, Number, Slider, Checkbox, CheckboxGroup, Dropdown, File, HTML, Button, ``gr.update`` and generator
event functions (the web UI enables the queue). Pictures are HTML with ``data:`` URLs (pictures.py), so nothing
private is written to gradio's temp folder by the tab. The functions bound to the buttons live in run.py.
"""
from __future__ import annotations

from . import run, webui

TAB_TITLE, TAB_ID = "IDDM", "iddm"
INTRO = ("**IDDM: train a personal LoRA whose portraits still look like you to people but are hard to link to you "
         "by face recognition.** Photos stay in memory; the LoRA goes to the web UI's Lora folder. Training loads "
         "its own copy of the base model and moves the web UI's model off the GPU while it runs (it comes back "
         "afterwards).")
LORA_HINT = ("Use it in a prompt as the tag below, with the prompt `a photo of sks person`. If the Lora tab does "
             "not list it yet, press its refresh button.")


def on_ui_tabs():
    """``script_callbacks.on_ui_tabs`` callback: ``[(blocks, title, elem_id)]``."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        build(gr)
    return [(tab, TAB_TITLE, TAB_ID)]


def _updates(gr, outputs: dict, values: dict) -> dict:
    """run.py's plain dict (key -> value) as gradio updates of the matching output components."""
    out = {}
    for key, value in values.items():
        if key in outputs:
            out[outputs[key]] = gr.update(value=value)
    return out


def build(gr) -> dict:
    """Lay the tab out inside the current Blocks; returns the components by name (tests and callers use it)."""
    c = {}
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=3):
            controls = _settings(gr, c)
        with gr.Column(scale=2):
            outputs = _outputs(gr)
    for name, component in c.items():          # stable ids: the web UI's CSS/JS hooks, and the tests
        component.elem_id = getattr(component, "elem_id", None) or f"iddm_{name}"
    outputs["uploads"] = c["uploads"]
    _bind(gr, c, outputs, controls)
    c.update(outputs)
    c.update({k: v for k, v in controls.items() if k.endswith("_button")})
    return c


def _settings(gr, c: dict) -> dict:
    """The left column: every field of run.TrainRequest into ``c``; returns the buttons (and the recogniser box)
    by name."""
    controls = {"refresh_models": _model_and_photos(gr, c)}
    controls.update(_protection(gr, c))
    _training(gr, c)
    with gr.Row():
        controls["preview_button"] = gr.Button("Preview faces", elem_id="iddm_preview")
        controls["train_button"] = gr.Button("Train", variant="primary", elem_id="iddm_train")
        controls["interrupt_button"] = gr.Button("Interrupt", elem_id="iddm_interrupt")
    return controls


def _model_and_photos(gr, c: dict):
    """Base model and photo fields; returns the checkpoint list's refresh button."""
    with gr.Row():
        c["checkpoint"] = gr.Dropdown(label="Base model", choices=webui.checkpoint_choices(),
                                      value=webui.CURRENT_CHOICE, elem_id="iddm_checkpoint",
                                      info="the checkpoint the LoRA is trained for (SD 1.x / 2.x / SDXL)")
        refresh_models = gr.Button("Refresh list", elem_id="iddm_refresh_checkpoints", scale=0)
    gr.Markdown("### Photos (3 or more of one person)")
    with gr.Row():
        c["photos_folder"] = gr.Textbox(label="Photo folder", placeholder="/path/to/my/photos",
                                        elem_id="iddm_photos_folder",
                                        info="a folder on this machine; and/or upload photos")
        c["uploads"] = gr.File(label="or upload photos", file_count="multiple", file_types=["image"],
                               elem_id="iddm_uploads")
    with gr.Row():
        c["n_reference"] = gr.Number(label="Reference photos (Xc)", value=0, precision=0,
                                     info="0 = half of them (at least 2); the rest are protected (X0)")
        c["split_seed"] = gr.Number(label="Split seed", value=0, precision=0)
        c["skip_faceless"] = gr.Checkbox(label="Skip photos without a face", value=True)
    return refresh_models


def _protection(gr, c: dict) -> dict:
    """PGD and recogniser fields; returns the recogniser status box and its refresh button."""
    from iddm_core.face.registry import KNOWN
    from iddm_core.frontend import PRESET_CHOICES

    gr.Markdown("### Protection (PGD)")
    with gr.Row():
        c["preset"] = gr.Dropdown(label="Preset", choices=PRESET_CHOICES, value="privacy",
                                  info="sets rho: privacy 0.1, balanced 0.3, fidelity 0.5, fast 0.3 + "
                                       "fast gradient; custom uses rho below")
        # Number fields, not sliders: a slider's number box clamps what is typed into its range without
        # a word; these pass it on and iddm_core.frontend.check_number names the parameter and its range
        c["T"] = gr.Number(label="T (PGD steps per iteration, 1-1000)", value=8, precision=0)
        c["rho"] = gr.Number(label="rho (Stage I share 0.01-0.99, custom only)", value=0.1)
    with gr.Row():
        c["eta"] = gr.Number(label="eta (L-inf budget 0.001-1; 0.08 = 20/255)", value=0.08)
        c["alpha"] = gr.Number(label="alpha (PGD step, at most eta)", value=0.008)
    with gr.Row():
        c["surrogates"] = gr.CheckboxGroup(label="Face recognisers to attack", choices=list(KNOWN),
                                           value=["dlib"], elem_id="iddm_surrogates")
        c["tau"] = gr.Number(label="tau (softmax temperature)", value=0.03)
    with gr.Accordion("Which recognisers are installed, and where to put the others", open=False):
        recognisers = gr.Textbox(value=run.recognisers_text(), show_label=False, lines=6,
                                 interactive=False, elem_id="iddm_recognisers")
        refresh_recognisers = gr.Button("Look again")
    return {"recognisers": recognisers, "refresh_recognisers": refresh_recognisers}


def _training(gr, c: dict) -> None:
    """Fine-tuning, output and advanced fields."""
    from iddm_core.frontend import GRADIENT_CHOICES

    gr.Markdown("### Training")
    with gr.Row():
        c["K"] = gr.Number(label="K (iterations)", value=10, precision=0)
        c["ft_steps"] = gr.Number(label="Fine-tune steps per burst", value=40, precision=0)
        c["rank"] = gr.Number(label="LoRA rank", value=4, precision=0)
        c["resolution"] = gr.Number(label="Resolution (0 = the model's own)", value=0, precision=0)
        c["seed"] = gr.Number(label="Training seed", value=0, precision=0)
    with gr.Row():
        c["train_text_encoder"] = gr.Checkbox(label="Train the text encoder too", value=False)
        c["lora_name"] = gr.Textbox(label="LoRA name", value="iddm_lora", elem_id="iddm_lora_name")
        c["overwrite"] = gr.Checkbox(label="Overwrite a LoRA of that name", value=False)
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            c["gradient"] = gr.Dropdown(label="PGD gradient", choices=GRADIENT_CHOICES, value="full",
                                        info="full = the paper's; sds, face, fast = cheaper")
            c["pgd_batch"] = gr.Number(label="PGD batch", value=1, precision=0)
            c["lr"] = gr.Number(label="Learning rate", value=1e-4)
            c["conv_rank"] = gr.Number(label="LoCon conv rank (0 = off)", value=0, precision=0,
                                       info="also LoRA on the UNet's ResBlock and sampler convolutions "
                                            "(kohya conv_dim)")
        with gr.Row():
            c["prior_preservation"] = gr.Checkbox(label="Prior preservation", value=True)
            c["num_class_images"] = gr.Number(label="Class images", value=8, precision=0)
            c["resume"] = gr.Checkbox(label="Resume an interrupted run of this LoRA name", value=True)
        c["reference_files"] = gr.Textbox(label="Reference photos by file name (optional)",
                                          placeholder="a.jpg, b.jpg: these form Xc, the rest X0")
        c["extra_surrogates"] = gr.Textbox(label="More recognisers (name:PATH, comma separated)")
        c["tokenizer"] = gr.Textbox(label="CLIP tokenizer folder (optional)",
                                    placeholder="found automatically (Forge's copy, or A1111's download)")


def _outputs(gr) -> dict:
    """The right column: progress, chart, faces, photos, summary and the LoRA tag, by name."""
    out = {"status": gr.Textbox(label="Progress", lines=3, interactive=False, elem_id="iddm_status"),
           "chart": gr.HTML(elem_id="iddm_chart"),
           "faces": gr.HTML(elem_id="iddm_faces"),
           "photos": gr.Textbox(label="Photos", lines=2, interactive=False, elem_id="iddm_photos"),
           "summary": gr.Textbox(label="Summary", lines=6, interactive=False, elem_id="iddm_summary")}
    gr.Markdown(LORA_HINT)
    out["tag"] = gr.Textbox(label="LoRA tag", interactive=False, show_copy_button=True, elem_id="iddm_tag")
    return out


def _bind(gr, c: dict, outputs: dict, controls: dict) -> None:
    """The controls' event functions (run.py does the work)."""
    train_inputs = [c[name] for name in run.FIELDS]
    preview_inputs = [c[name] for name in run.PREVIEW_FIELDS]

    def train(*values):
        """The Train button (a generator: gradio streams each update)."""
        for update in run.train(run.TrainRequest(**dict(zip(run.FIELDS, values)))):
            yield _updates(gr, outputs, update)

    def preview(*values):
        return _updates(gr, outputs, run.preview(run.TrainRequest(**dict(zip(run.PREVIEW_FIELDS, values)))))

    def interrupt():
        return gr.update(value=run.ACTIVE.interrupt())

    def refresh_checkpoints(current):
        choices = webui.checkpoint_choices(refresh=True)
        return gr.update(choices=choices, value=current if current in choices else webui.CURRENT_CHOICE)

    controls["train_button"].click(fn=train, inputs=train_inputs, outputs=list(outputs.values()),
                                  show_progress="minimal")
    controls["preview_button"].click(fn=preview, inputs=preview_inputs,
                                    outputs=[outputs["faces"], outputs["photos"], c["uploads"]],
                                    show_progress="minimal")
    controls["interrupt_button"].click(fn=interrupt, inputs=[], outputs=[outputs["status"]], queue=False)
    controls["refresh_models"].click(fn=refresh_checkpoints, inputs=[c["checkpoint"]], outputs=[c["checkpoint"]])
    controls["refresh_recognisers"].click(fn=run.recognisers_text, inputs=[], outputs=[controls["recognisers"]])
