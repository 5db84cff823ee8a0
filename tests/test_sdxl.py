"""SDXL: the tiny SDXL-shaped model loads the same from a diffusers folder and an SGM-layout single file; kind
detection; the shipped full-size configs fit the SGM key layout; DreamBooth-LoRA (UNet), sampling, PGD and IDDM run
on SDXL with its conditioning (two encoders, pooled embedding, size ids); the LoRA export still refuses SDXL."""
import socket

import pytest
import torch
from safetensors.torch import save_file

from iddm_core.diffusion import single_file, tokenizers
from iddm_core.diffusion.bundle import clean_config
from iddm_core.diffusion.reading import shipped_configs
from iddm_core import sd_keys
from iddm_core.errors import ModelError
from iddm_core.diffusion.kinds import detect_kind
from iddm_core.diffusion.loading import load_model
from iddm_core.diffusion.reading import read_checkpoint
from iddm_core.diffusion.validation import validate_model
from iddm_core.diffusion.tiny import (SDXL_TEXT_CONFIG_2, SDXL_TIME_EMBED_DIM, TINY_SDXL_TITLE, build_tiny_bundle,
                            write_tiny_model)

PROMPTS = ["a photo of sks person", "a photo of person"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loading must be purely local: any connection attempt fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", lambda kind: None)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("xl"), kind="sdxl")


@pytest.fixture(scope="module")
def loaded(written):
    folder, single = written
    return load_model(str(folder)), load_model(str(single), tokenizer=str(folder / "tokenizer"))


def _ids(tok):
    return tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def _outputs(bundle) -> dict:
    """Every network on fixed inputs, as SDXL uses them (penultimate hidden states, pooled projection)."""
    g = torch.Generator().manual_seed(3)
    ids_1, ids_2 = _ids(bundle.tokenizer), _ids(bundle.tokenizer_2)
    out_1 = bundle.text_encoder(ids_1, output_hidden_states=True)
    out_2 = bundle.text_encoder_2(ids_2, output_hidden_states=True)
    context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 64.0, 8.0, 0.0, 64.0, 64.0]])
    latents = torch.randn(2, 4, 8, 8, generator=g)
    eps = bundle.unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": out_2.text_embeds, "time_ids": time_ids}).sample
    z = torch.randn(1, 4, 8, 8, generator=g)
    return {"ids_1": ids_1, "ids_2": ids_2, "text_1": out_1.last_hidden_state, "text_1_penult": out_1.hidden_states[-2],
            "text_2": out_2.last_hidden_state, "text_2_pooled": out_2.text_embeds, "unet": eps,
            "vae_decode": bundle.vae.decode(z).sample}


def _max_diffs(a, b) -> dict:
    oa, ob = _outputs(a), _outputs(b)
    assert oa.keys() == ob.keys()
    diffs = {}
    for k in oa:
        assert oa[k].shape == ob[k].shape, k
        diffs[k] = float((oa[k].double() - ob[k].double()).abs().max())
    return diffs


# ------------------------------------------------------------------------------------------ loading paths
def test_folder_and_single_file_give_the_same_tiny_sdxl(loaded):
    folder_b, single_b = loaded
    diffs = _max_diffs(folder_b, single_b)
    print("folder vs single file, max abs diff:", diffs)
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    # and both are the model that was written (a weight left at random init would show here)
    source = build_tiny_bundle(0, "sdxl")
    for b in loaded:
        d = _max_diffs(source, b)
        assert all(v <= 1e-5 for v in d.values()), d
    assert type(single_b.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert single_b.unet.config.addition_embed_type == "text_time"


def test_single_file_weights_are_exact(loaded):
    """The SGM writer (sd_keys) and diffusers' converters are inverse maps: every tensor comes back bit-equal."""
    source = build_tiny_bundle(0, "sdxl")
    _, single_b = loaded
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(source, part).state_dict(), getattr(single_b, part).state_dict()
        assert want.keys() == got.keys(), part
        for k in want:
            assert torch.equal(want[k], got[k]), (part, k)


def test_time_ids_matter_so_the_added_embedding_is_wired(loaded):
    _, b = loaded
    g = torch.Generator().manual_seed(0)
    n = SDXL_TEXT_CONFIG_2["projection_dim"]
    ctx = torch.randn(1, 77, b.unet.config.cross_attention_dim, generator=g)
    lat, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, n, generator=g)
    with torch.no_grad():
        x = b.unet(lat, 5, encoder_hidden_states=ctx, added_cond_kwargs={
            "text_embeds": emb, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
        y = b.unet(lat, 5, encoder_hidden_states=ctx, added_cond_kwargs={
            "text_embeds": emb, "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])}).sample
    assert float((x - y).abs().max()) > 1e-4
    assert b.unet.config.projection_class_embeddings_input_dim == n + 6 * SDXL_TIME_EMBED_DIM


def test_bundle_fields_and_tokenizers(loaded):
    folder_b, single_b = loaded
    for b in loaded:
        assert b.kind == "sdxl" and b.prediction_type == "epsilon" and b.title == TINY_SDXL_TITLE
        assert b.tokenizer_2.pad_token == "!" and b.tokenizer.pad_token == "<|endoftext|>"
        assert b.scaling_factor == pytest.approx(0.13025)
    assert torch.equal(_ids(folder_b.tokenizer_2), _ids(single_b.tokenizer_2))
    assert torch.equal(_ids(folder_b.tokenizer), _ids(single_b.tokenizer))
    sd1 = build_tiny_bundle(0)
    assert sd1.text_encoder_2 is None and sd1.tokenizer_2 is None


# ------------------------------------------------------------------------------------------ kind detection
def test_kind_detection(written, tmp_path):
    folder, single = written
    tok = str(folder / "tokenizer")
    state, metadata = read_checkpoint(single)
    assert detect_kind(state, metadata=metadata) == "sdxl"
    assert validate_model(str(single), tokenizer=tok).kind == "sdxl"
    assert validate_model(str(folder)).kind == "sdxl"
    # sdxl-v: explicit override, a v_pred key, or declared metadata
    v = load_model(str(single), kind="sdxl-v", tokenizer=tok)
    assert v.kind == "sdxl-v" and v.prediction_type == "v_prediction"
    assert v.noise_scheduler.config.prediction_type == "v_prediction"
    assert load_model(str(folder), kind="sdxl-v").prediction_type == "v_prediction"
    assert detect_kind({**state, "v_pred": torch.tensor([])}) == "sdxl-v"
    assert detect_kind(state, metadata={"modelspec.prediction_type": "v"}) == "sdxl-v"
    assert detect_kind(state, metadata={"modelspec.prediction_type": "epsilon"}) == "sdxl"
    vfile = tmp_path / "v.safetensors"
    save_file({**state, "v_pred": torch.tensor([])}, str(vfile), metadata=metadata)
    assert load_model(str(vfile), tokenizer=tok).kind == "sdxl-v"
    # an SD1 checkpoint is still sd1, and kinds that do not fit the file are refused by name
    _, sd1_file = write_tiny_model(tmp_path / "sd1")
    assert detect_kind(read_checkpoint(sd1_file)[0]) == "sd1"
    assert validate_model(str(sd1_file), tokenizer=tok).kind == "sd1"
    with pytest.raises(ModelError, match="kind='sd1'"):
        load_model(str(single), kind="sd1", tokenizer=tok)
    with pytest.raises(ModelError, match="kind='sdxl'"):
        load_model(str(sd1_file), kind="sdxl", tokenizer=tok)


def test_incomplete_sdxl_is_refused_naming_what_is_missing(written, tmp_path):
    state, _ = read_checkpoint(written[1])
    partial = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(ModelError, match="conditioner.embedders.1.model"):
        detect_kind(partial, "partial.safetensors")


def test_comfy_bundled_tokenizer_serves_both_encoders(written, tmp_path, monkeypatch):
    from iddm_core.diffusion.tiny import write_tiny_tokenizer

    comfy_tok = write_tiny_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", lambda kind: comfy_tok)
    b = load_model(str(written[1]))
    assert b.tokenizer.pad_token == "<|endoftext|>" and b.tokenizer_2.pad_token == "!"
    source = build_tiny_bundle(0, "sdxl")
    assert torch.equal(_ids(b.tokenizer), _ids(source.tokenizer))
    assert torch.equal(_ids(b.tokenizer_2), _ids(source.tokenizer_2))


def test_missing_tokenizer_for_sdxl_single_file(written, monkeypatch):
    # the pack's own files have their tokenizer built in; a foreign SDXL file with none found is told where
    monkeypatch.setattr(single_file, "carries_tiny_vocabulary", lambda *a: False)
    with pytest.raises(ModelError, match="tiny-sdxl.safetensors.*vocab.json"):
        load_model(str(written[1]))


def test_shipped_configs_describe_full_size_sdxl():
    """The shipped sdxl/*.json on the meta device: SGM keys written from them convert back onto them, and the
    sizes are SDXL's published ones (UNet 2.567 G parameters, ViT-L 123 M, ViT-bigG with projection 695 M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = shipped_configs("sdxl")
    assert shipped_configs("sdxl-v").keys() == cfg.keys()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean_config(cfg["unet"]))
        vae = AutoencoderKL.from_config(clean_config(cfg["vae"]))
        te1 = CLIPTextModel(CLIPTextConfig(**clean_config(cfg["text_encoder"])))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clean_config(cfg["text_encoder_2"])))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in te1.parameters()) == 123_060_480
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840
    state = {**sd_keys.unet_to_ldm(unet.state_dict(), unet.config), **sd_keys.vae_to_ldm(vae.state_dict(), vae.config),
             **sd_keys.clip_to_ldm(te1.state_dict(), prefix=sd_keys.SDXL_CLIP_PREFIX),
             **sd_keys.clip_to_openclip(te2.state_dict(), extra_last_layer=False, prefix=sd_keys.SDXL_OPENCLIP_PREFIX)}
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert detect_kind(state) == "sdxl"
    parts = single_file.single_file_parts("sdxl.safetensors", state, cfg, "sdxl")
    assert [p for p, _, _ in parts] == ["UNet", "VAE", "text encoder", "text encoder 2"]
    for part, factory, part_state in parts:
        with torch.device("meta"):
            single_file.check_state(factory().state_dict(), part_state, "sdxl.safetensors", part, "sdxl")


# ------------------------------------------------------------------------------------------ a run's LoRA: not yet
# ------------------------------------------------------------------------------------------ training on SDXL
RES = 64


def _ft_config(**kw):
    from iddm_core.training.finetune import FinetuneConfig

    base = dict(num_class_images=1, class_sampler_steps=2, resolution=RES, seed=0, lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


class _UnetSpy:
    """Forward pre-hook on the UNet that records the conditioning keyword arguments of every call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        self.calls.append({"context": kwargs.get("encoder_hidden_states"), "text_embeds": added.get("text_embeds"),
                           "time_ids": added.get("time_ids"), "batch": args[0].shape[0]})

    def close(self):
        self.handle.remove()


def _check_sdxl_calls(calls, bundle, resolution):
    cross = bundle.unet.config.cross_attention_dim
    width = bundle.text_encoder.config.hidden_size + bundle.text_encoder_2.config.hidden_size
    assert cross == width
    for c in calls:
        n = c["batch"]
        assert c["context"].shape == (n, 77, cross)
        assert c["text_embeds"].shape == (n, SDXL_TEXT_CONFIG_2["projection_dim"])
        assert c["time_ids"].shape == (n, 6)
        want = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        assert torch.equal(c["time_ids"].float(), want.expand(n, 6))


def test_sdxl_conditioning_parts_and_target_size_matters():
    from iddm_core.training.conditioning import SDXLConditioning, encode_prompts, sdxl_conditioning, unet_conditioning

    b = build_tiny_bundle(0, "sdxl")
    with torch.no_grad():
        c = sdxl_conditioning(b, PROMPTS, 64)
        ref = _outputs(b)    # the test's own reading of SDXL: penultimate states of both, pooled from encoder 2
        assert isinstance(c, SDXLConditioning) and isinstance(encode_prompts(b, PROMPTS), SDXLConditioning)
        assert torch.equal(c.context, torch.cat([ref["text_1_penult"], _penult_2(b)], dim=-1))
        assert torch.equal(c.text_embeds, ref["text_2_pooled"])
        assert torch.equal(c.time_ids, torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
        lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        at_64 = b.unet(lat, 10, **unet_conditioning(c, torch.float32)).sample
        at_128 = b.unet(lat, 10, **unet_conditioning(sdxl_conditioning(b, PROMPTS, 128), torch.float32)).sample
    assert float((at_64 - at_128).abs().max()) > 1e-4      # the size conditioning reaches the UNet
    # SD1 keeps its plain hidden-state tensor
    sd1 = build_tiny_bundle(0)
    assert isinstance(encode_prompts(sd1, PROMPTS), torch.Tensor)


def _penult_2(b):
    return b.text_encoder_2(_ids(b.tokenizer_2), output_hidden_states=True).hidden_states[-2]


def test_sdxl_dreambooth_bursts_train_the_unet_lora_with_sdxl_conditioning():
    from iddm_core.training.finetune import DreamBoothTrainer
    from iddm_core.training.lora import LoraSpec, get_lora_state

    bundle = build_tiny_bundle(0, "sdxl")
    spy = _UnetSpy(bundle.unet)
    try:
        trainer = DreamBoothTrainer(bundle, LoraSpec(rank=2), _ft_config())   # samples 1 class image (CFG)
        sampling_calls = list(spy.calls)
        spy.calls.clear()
        before = get_lora_state(bundle)
        x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
        losses = trainer.train(x, 2) + trainer.train(x, 1)
    finally:
        spy.close()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = get_lora_state(bundle)
    assert before.keys() == after.keys() and all(k.startswith("unet.") for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("lora_B"))
    # sampling: 2 DDIM steps, each one batched [uncond, cond]; the negative is zero text, same size ids
    assert len(sampling_calls) == 2 and all(c["batch"] == 2 for c in sampling_calls)
    _check_sdxl_calls(sampling_calls, bundle, RES)
    assert float(sampling_calls[0]["context"][0].abs().max()) == 0.0
    assert float(sampling_calls[0]["context"][1].abs().max()) > 0.0
    # training: instance + prior-preservation rows in one call per step, each with its own prompt's conditioning
    assert len(spy.calls) == 3 and all(c["batch"] == 2 for c in spy.calls)
    _check_sdxl_calls(spy.calls, bundle, RES)
    first = spy.calls[0]
    assert torch.equal(first["context"][0], trainer.prompt_embeds.context[0])
    assert torch.equal(first["context"][1], trainer.prompt_embeds.context[1])
    assert torch.equal(first["text_embeds"][1], trainer.prompt_embeds.text_embeds[1])
    assert not torch.equal(first["text_embeds"][0], first["text_embeds"][1])
    # the text encoders stay frozen
    assert not any(p.requires_grad for m in (bundle.text_encoder, bundle.text_encoder_2) for p in m.parameters())
    assert not any(p.grad is not None for p in bundle.text_encoder_2.parameters())


def test_sdxl_text_encoder_lora_trains_both_encoders():
    """train_text_encoder on SDXL: the conditioning is recomputed with gradient through both encoders' LoRAs,
    and PGD's instance conditioning follows the trained encoders."""
    from iddm_core.training.finetune import DreamBoothTrainer
    from iddm_core.training.lora import LoraSpec, get_lora_state

    bundle = build_tiny_bundle(0, "sdxl")
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=2, train_text_encoder=True), _ft_config(prior_preservation=False))
    before, embeds_before = get_lora_state(bundle), trainer.instance_embeds()
    losses = trainer.train(torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(2)), 2)
    after, embeds_after = get_lora_state(bundle), trainer.instance_embeds()
    assert all(torch.isfinite(torch.tensor(losses)))
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        keys = [k for k in after if k.startswith(part) and k.endswith("lora_B")]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), part
    assert embeds_after.shape == embeds_before.shape == (1, 77, bundle.unet.config.cross_attention_dim)
    assert not torch.equal(embeds_after.context, embeds_before.context)
    assert not torch.equal(embeds_after.text_embeds, embeds_before.text_embeds)
    assert not bundle.text_encoder_2.training and not bundle.unet.training


def test_sdxl_generate_images_size():
    from iddm_core.training.sampling import generate_images

    bundle = build_tiny_bundle(0, "sdxl")
    spy = _UnetSpy(bundle.unet)
    try:
        images = generate_images(bundle, PROMPTS[0], 3, steps=2, resolution=48, batch=2)
    finally:
        spy.close()
    assert images.shape == (3, 3, 48, 48) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert len(spy.calls) == 4           # 2 batches x 2 steps
    _check_sdxl_calls(spy.calls, bundle, 48)


class _Mean(torch.nn.Module):
    """Stand-in ensemble (as tests/test_pgd.py): 'similarity' = mean pixel value (differentiable, cheap)."""

    def set_references(self, images, landmarks):
        pass

    def forward(self, images, landmarks):
        s = images.mean(dim=(1, 2, 3))
        return 1 + s.mean(), {"fake": s}


def test_pgd_two_stage_on_sdxl():
    from iddm_core.training.conditioning import encode_prompts
    from iddm_core.protection.pgd import PGDConfig, pgd_two_stage

    bundle = build_tiny_bundle(0, "sdxl")
    with torch.no_grad():
        embeds = encode_prompts(bundle, [PROMPTS[0]], RES).detach()
    x0 = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    cfg = PGDConfig(T=4, rho=0.5, eta=0.03, alpha=0.01)
    steps = []
    spy = _UnetSpy(bundle.unet)
    try:
        x = pgd_two_stage(bundle, _Mean(), x0, torch.zeros(2, 5, 2), embeds, cfg, torch.Generator().manual_seed(0),
                          on_step=steps.append)
    finally:
        spy.close()
    assert [s["stage"] for s in steps] == ["rec", "rec", "id", "id"]
    assert (x - x0).abs().max() <= cfg.eta + 1e-6 and x.min() >= 0 and x.max() <= 1
    assert (x - x0).abs().max() > 0.5 * cfg.eta          # it moved
    assert all(s["redone_fp32"] == 0 and s["skipped"] == 0 for s in steps)
    assert len(spy.calls) == 4 * 2                      # pgd batch 1: one UNet call per image per step
    _check_sdxl_calls(spy.calls, bundle, RES)
    assert all(p.grad is None for m in (bundle.unet, bundle.text_encoder_2) for p in m.parameters())


def test_run_iddm_on_sdxl_with_and_without_writing_a_lora(tmp_path):
    from iddm_core.demo.story import demo_photos
    from iddm_core.face.detect import get_detector
    from iddm_core.protection.iddm import IDDMConfig, run_iddm
    from iddm_core.protection.pgd import PGDConfig
    from iddm_core.protection.refs import refs_from_photos

    refs = refs_from_photos(demo_photos(), RES, get_detector("dlib"), seed=0)
    cfg = IDDMConfig(K=1, pgd=PGDConfig(T=2, rho=0.5, eta=0.05, alpha=0.02), ft_steps=1, resolution=RES,
                     num_class_images=1, seed=0)
    bundle = build_tiny_bundle(0, "sdxl")
    result = run_iddm(bundle, refs, cfg, out_path=None, ensemble=_Mean())
    assert result.lora_path is None and not any(tmp_path.iterdir())
    # and with an output file: the run's LoRA is a valid kohya SDXL LoRA
    from iddm_core.training.kohya_check import check_kohya, read_kohya_lora

    written = run_iddm(build_tiny_bundle(0, "sdxl"), refs, cfg, out_path=tmp_path / "me.safetensors",
                       ensemble=_Mean())
    tensors, meta = read_kohya_lora(written.lora_path)
    assert check_kohya(tensors, meta) == [] and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    x_clean = refs.protect()[0]
    assert result.protected.shape == x_clean.shape
    assert (result.protected - x_clean).abs().max() <= 0.05 + 1e-6
    assert (result.protected - x_clean).abs().max() > 0
    it = result.report["iterations"][0]
    assert [s["stage"] for s in it["pgd"]] == ["rec", "id"]
    assert all(torch.isfinite(torch.tensor(it["finetune_reference"] + it["finetune_protected"])))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_tiny_model_kind_sdxl_writes_both_forms(tmp_path, capsys):
    from iddm_core.cli import main

    assert main(["tiny-model", "--kind", "sdxl", str(tmp_path / "m")]) == 0
    folder, single = tmp_path / "m" / "tiny-sdxl", tmp_path / "m" / "tiny-sdxl.safetensors"
    assert (folder / "model_index.json").is_file() and single.is_file()
    for sub in ("text_encoder_2", "tokenizer_2", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert "StableDiffusionXLPipeline" in (folder / "model_index.json").read_text()
    state, _ = read_checkpoint(single)
    assert any(k.startswith("conditioner.embedders.0.transformer.") for k in state)
    assert any(k.startswith("conditioner.embedders.1.model.") for k in state)
    assert not any(k.startswith("cond_stage_model.") for k in state)
    assert validate_model(str(single), tokenizer=str(folder / "tokenizer")).kind == "sdxl"
    out = capsys.readouterr().out
    assert str(folder) in out and str(single) in out


def test_half_precision_base_weights_train_attack_and_export_with_fp32_lora(tmp_path):
    """On a GPU the frozen UNet and both text encoders are stored in the autocast dtype (precision.weight_dtypes):
    here bf16 on the CPU. Training (UNet + text-encoder LoRA), sampling, PGD and the kohya export all run; the
    LoRA stays fp32 and learns; the VAE stays fp32."""
    from safetensors import safe_open

    from iddm_core.training.conditioning import encode_prompts
    from iddm_core.training.finetune import DreamBoothTrainer
    from iddm_core.training.kohya import save_kohya_lora
    from iddm_core.training.lora import LoraSpec, get_lora_state, lora_parameters
    from iddm_core.protection.pgd import PGDConfig, pgd_two_stage
    from iddm_core.diffusion.runtime import Runtime

    runtime = Runtime.decide("cpu", "bf16")
    bundle = load_model("tiny", kind="sdxl", weight_dtypes=runtime.weight_dtypes)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(bundle, part).parameters()} == {torch.bfloat16}, part
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    spec = LoraSpec(rank=2, train_text_encoder=True)
    trainer = DreamBoothTrainer(bundle, spec, _ft_config(mixed_precision="bf16"))
    before = get_lora_state(bundle)
    x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    losses = trainer.train(x, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in lora_parameters(bundle)} == {torch.float32}
    after = get_lora_state(bundle)
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert {p.dtype for p in bundle.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        embeds = encode_prompts(bundle, [PROMPTS[0]], RES).detach()
    cfg = PGDConfig(T=2, rho=0.5, eta=0.03, alpha=0.01)
    x0 = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    steps = []
    xp = pgd_two_stage(bundle, _Mean(), x0, torch.zeros(1, 5, 2), embeds, cfg, torch.Generator().manual_seed(0),
                       on_step=steps.append, runtime=runtime)
    assert torch.isfinite(xp).all() and 0 < (xp - x0).abs().max() <= cfg.eta + 1e-6
    assert all(s["skipped"] == 0 for s in steps)
    out = save_kohya_lora(tmp_path / "half.safetensors", bundle, spec, output_name="half")
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)


def test_cli_train_finetune_inspect_evaluate_on_an_sdxl_single_file(tmp_path, small_faces_dir, monkeypatch, capsys):
    """The commands a user runs, on the tiny SDXL single file: train (IDDM) and finetune write SDXL LoRAs that
    inspect reads as sdxl, and evaluate samples through one of them at the model's native size."""
    import json

    from iddm_core.cli import main

    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["tiny-model", "--kind", "sdxl", str(tmp_path / "m")]) == 0
    single = tmp_path / "m" / "tiny-sdxl.safetensors"
    model = ["--model", str(single)]            # no --tokenizer: the pack's own files carry theirs built in
    iddm_out, ft_out = tmp_path / "iddm.safetensors", tmp_path / "ft.safetensors"
    assert main(["train", "--refs", str(small_faces_dir), "--out", str(iddm_out), *model, "--K", "1", "--T", "2",
                 "--ft-steps", "1", "--no-prior"]) == 0
    assert main(["finetune", "--refs", str(small_faces_dir), "--out", str(ft_out), *model, "--steps", "1",
                 "--no-prior"]) == 0
    capsys.readouterr()
    for lora in (iddm_out, ft_out):
        assert main(["inspect", "--json", str(lora)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == "sdxl" and info["compatible"], info
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--lora", str(iddm_out), "--refs", str(small_faces_dir), "--out-json", str(report),
                 *model, "--prompts", "a photo of sks person", "--n", "1", "--steps", "2",
                 "--eval-recognizers", "dlib", "--surrogates", "dlib"]) == 0
    assert report.is_file()


def test_resume_fingerprint_reads_the_second_tokenizer():
    """A different tokenizer_2 (how the OpenCLIP tower reads the prompts) is a different base model for resume."""
    from iddm_core.training.checkpoint import model_hash

    a, b = build_tiny_bundle(0, "sdxl"), build_tiny_bundle(0, "sdxl")
    assert model_hash(a) == model_hash(b)
    b.tokenizer_2.pad_token = "<|endoftext|>"       # pads with the end token instead of "!"
    assert model_hash(a) != model_hash(b)
