"""SDXL LoRA (issue 13): injection on the UNet and both text encoders, kohya export as kohya-ss writes SDXL
LoRAs (original SGM UNet module names, ``lora_te1_`` / ``lora_te2_``), read back by diffusers' kohya reader."""
import re
import socket

import pytest
import torch

from iddm_core.diffusion.bundle import ModelBundle, clean_config
from iddm_core.diffusion.reading import shipped_configs
from iddm_core import sd_keys
from iddm_core.training.kohya import kohya_state_dict, save_kohya_lora, sdxl_unet_module_path
from iddm_core.training.kohya_check import check_kohya, inspect_lora, read_kohya_lora
from iddm_core.training.lora import ADAPTER, LoraSpec, add_lora, lora_layers
from iddm_core.diffusion.tiny import build_tiny_bundle

SPEC = dict(rank=4, alpha=2.0, include_proj=True, include_ff=True, train_text_encoder=True)
PROMPT = ["a photo of sks person"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Everything here is local: any connection attempt fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _fill_lora(bundle, seed: int = 7, scale: float = 0.3) -> None:
    """Non-zero LoRA weights (``lora_B`` starts at zero, so an untouched adapter would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (bundle.unet, bundle.text_encoder, bundle.text_encoder_2):
            for _, layer in lora_layers(module):
                for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def adapted():
    bundle = build_tiny_bundle(0, "sdxl")
    spec = LoraSpec(**SPEC)
    add_lora(bundle, spec)
    _fill_lora(bundle)
    return bundle, spec


@pytest.fixture(scope="module")
def adapted_locon():
    """As ``adapted`` plus LoCon: the ResBlock and sampler layers (3x3 convs at conv_rank 3, conv_alpha 1.5)."""
    bundle = build_tiny_bundle(0, "sdxl")
    spec = LoraSpec(**SPEC, conv_rank=3, conv_alpha=1.5)
    add_lora(bundle, spec)
    _fill_lora(bundle)
    return bundle, spec


def _fresh_pipeline():
    from diffusers import StableDiffusionXLPipeline

    f = build_tiny_bundle(0, "sdxl")
    return StableDiffusionXLPipeline(vae=f.vae, text_encoder=f.text_encoder, text_encoder_2=f.text_encoder_2,
                                     tokenizer=f.tokenizer, tokenizer_2=f.tokenizer_2, unet=f.unet,
                                     scheduler=f.noise_scheduler)


@torch.no_grad()
def _outputs(unet, te1, te2, tok1, tok2) -> dict:
    """Both encoders as SDXL uses them (penultimate hidden states, pooled projection) and the UNet on fixed
    inputs (its context and pooled embedding fixed too, so each part is compared on its own)."""
    ids_1 = tok1(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_2 = tok2(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    o1, o2 = te1(ids_1, output_hidden_states=True), te2(ids_2, output_hidden_states=True)
    g = torch.Generator().manual_seed(11)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, te2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 64.0, 8.0, 0.0, 64.0, 64.0]])
    latents = torch.randn(2, 4, 8, 8, generator=g)
    eps = unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return {"unet": eps, "te1": o1.last_hidden_state, "te1_penult": o1.hidden_states[-2],
            "te2": o2.last_hidden_state, "te2_penult": o2.hidden_states[-2], "te2_pooled": o2.text_embeds}


def test_injection_covers_unet_and_both_text_encoders(adapted):
    bundle, spec = adapted
    names = {part: [n for n, _ in lora_layers(m)] for part, m in
             (("unet", bundle.unet), ("te1", bundle.text_encoder), ("te2", bundle.text_encoder_2))}
    # per transformer block 8 attention projections + 2 ff; per attention proj_in + proj_out (counted from the model)
    blocks = {n.rsplit(".attn1", 1)[0] for n, _ in bundle.unet.named_modules() if n.endswith(".attn1")}
    attentions = {n.split(".transformer_blocks")[0] for n in blocks}
    assert len(names["unet"]) == 10 * len(blocks) + 2 * len(attentions)
    assert len(names["te1"]) == 4 * bundle.text_encoder.config.num_hidden_layers
    assert len(names["te2"]) == 4 * bundle.text_encoder_2.config.num_hidden_layers
    trainable = [n for m in (bundle.unet, bundle.vae, bundle.text_encoder, bundle.text_encoder_2)
                 for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float16, 2e-2)])
@pytest.mark.parametrize("which", ["adapted", "adapted_locon"])
def test_diffusers_sdxl_kohya_loader_reproduces_adapted_model(request, which, tmp_path, dtype, tol):
    bundle, spec = request.getfixturevalue(which)
    path = save_kohya_lora(tmp_path / "xl.safetensors", bundle, spec, "xl", dtype=dtype)
    pipe = _fresh_pipeline()
    base = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    theirs = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2)
    ours = _outputs(bundle.unet, bundle.text_encoder, bundle.text_encoder_2, bundle.tokenizer, bundle.tokenizer_2)
    diffs = {k: float((ours[k] - theirs[k]).abs().max()) for k in ours}
    effects = {k: float((ours[k] - base[k]).abs().max()) for k in ours}
    print("max |ours - diffusers|:", diffs, "\nmax |ours - base|:", effects)
    for k in ours:
        assert effects[k] > 0.05, k          # the LoRA matters on every output, else equality proves nothing
        assert diffs[k] < tol, k
    from peft.tuners.lora import LoraLayer   # and diffusers put a LoRA on every UNet layer we did (LoCon: the convs)

    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(list(lora_layers(bundle.unet)))


def test_sdxl_file_names_metadata_and_inspection(adapted, tmp_path):
    bundle, spec = adapted
    sd = kohya_state_dict(bundle, spec)
    modules = {k.split(".")[0] for k in sd}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_input_blocks_7_1_proj_in" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in modules
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in modules
    assert not any(m.startswith("lora_te_") or "down_blocks" in m or "up_blocks" in m or "mid_block" in m
                   for m in modules)
    path = save_kohya_lora(tmp_path / "xl.safetensors", bundle, spec, "xl")
    info = inspect_lora(path)
    meta = info["metadata"]
    assert info["compatible"], info["problems"]
    assert info["kind"] == "sdxl" and info["rank"] == 4 and info["alpha"] == 2.0
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == f"{bundle.resolution}x{bundle.resolution}"
    n_te1 = sum(m.startswith("lora_te1_") for m in modules)
    n_te2 = sum(m.startswith("lora_te2_") for m in modules)
    assert info["modules"] == {"unet": len(modules) - n_te1 - n_te2, "te": n_te1 + n_te2, "te1": n_te1, "te2": n_te2}
    # hashes as for SD1: over the tensors written with only the ss_* metadata
    from iddm_core.training.kohya import kohya_hashes
    tensors, _ = read_kohya_lora(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, meta)
    # the checker holds names to the declared base: SD1 names in an SDXL file (and the reverse) are flagged
    sd1_meta = dict(meta, ss_base_model_version="sd_v1", **{"modelspec.architecture": "stable-diffusion-v1/lora"})
    assert any("not an SD1/SD2 kohya module name" in p for p in check_kohya(tensors, sd1_meta))
    renamed = {k.replace("lora_te1_", "lora_te_"): v for k, v in tensors.items()}
    assert any("not an SDXL kohya module name" in p for p in check_kohya(renamed, meta))


def test_sdxl_v_metadata(tmp_path):
    bundle = build_tiny_bundle(0, "sdxl-v")
    spec = LoraSpec(rank=2)
    add_lora(bundle, spec)
    info = inspect_lora(save_kohya_lora(tmp_path / "v.safetensors", bundle, spec, "v"))
    assert info["compatible"], info["problems"]
    assert info["kind"] == "sdxl-v" and info["metadata"]["modelspec.prediction_type"] == "v"
    assert info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert info["modules"]["te"] == 0


# ------------------------------------------------------------------------------------------ full size
def _full_size_bundle(conv_rank: int = 0):
    """Full-size SDXL (the shipped configs) on the meta device, LoRA layers materialised on the CPU (small);
    returns (bundle, spec, the original-layout module names of the base model before any LoRA)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = shipped_configs("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean_config(cfg["unet"]))
        te1 = CLIPTextModel(CLIPTextConfig(**clean_config(cfg["text_encoder"])))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clean_config(cfg["text_encoder_2"])))
        vae = torch.nn.Linear(1, 1)
    bundle = ModelBundle(unet=unet, vae=vae, text_encoder=te1, tokenizer=None, noise_scheduler=None,
                                    kind="sdxl", prediction_type="epsilon", resolution=1024, title="sdxl-meta",
                                    text_encoder_2=te2)
    sgm = _sgm_module_names(bundle)
    spec = LoraSpec(**SPEC, conv_rank=conv_rank)
    add_lora(bundle, spec)
    for module in (unet, te1, te2):
        for _, layer in lora_layers(module):
            for ab in (layer.lora_A, layer.lora_B):
                ab[ADAPTER].to_empty(device="cpu")
                torch.nn.init.zeros_(ab[ADAPTER].weight)
    return bundle, spec, sgm


def _sgm_module_names(bundle) -> dict[str, set]:
    """Module paths of the original SDXL checkpoint layout, from the SGM keys sd_keys writes for this model:
    UNet ``input_blocks...``; text encoder 1 HF CLIP; text encoder 2 OpenCLIP (q/k/v fused in ``in_proj``)."""
    unet = {k[len(sd_keys.UNET_PREFIX):].rsplit(".", 1)[0]
            for k in sd_keys.unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config)}
    te1 = {k[len(sd_keys.SDXL_CLIP_PREFIX):].rsplit(".", 1)[0]
           for k in sd_keys.clip_to_ldm(bundle.text_encoder.state_dict(), prefix=sd_keys.SDXL_CLIP_PREFIX)}
    te2 = {k[len(sd_keys.SDXL_OPENCLIP_PREFIX):] for k in
           sd_keys.clip_to_openclip(bundle.text_encoder_2.state_dict(), extra_last_layer=False,
                                    prefix=sd_keys.SDXL_OPENCLIP_PREFIX)}
    return {"unet": unet, "te1": te1, "te2": te2}


def _openclip_name(hf_module: str) -> str:
    """An HF CLIP encoder-layer module -> the OpenCLIP key holding its weight (the fused in_proj for q/k/v)."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", hf_module)
    if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_weight"
    return f"transformer.resblocks.{m[1]}.{dict(sd_keys._OPENCLIP_LAYER)[m[2]]}.weight"


# LoCon adds SDXL's 17 ResBlocks x (in_layers.2, out_layers.3, emb_layers.1) + 11 skip connections + 4 samplers
@pytest.mark.parametrize("conv_rank,locon", [(0, 0), (4, 17 * 3 + 11 + 4)])
def test_full_size_sdxl_keys_map_to_original_and_diffusers_layouts(conv_rank, locon):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft

    bundle, spec, sgm = _full_size_bundle(conv_rank)
    sd = kohya_state_dict(bundle, spec)
    kohya_modules = sorted({k.split(".")[0] for k in sd})
    by_part = {p: [m for m in kohya_modules if m.startswith(f"lora_{p}_")] for p in ("unet", "te1", "te2")}
    assert sum(map(len, by_part.values())) == len(kohya_modules)
    # SDXL: 70 transformer blocks x (4 + 4 attention + 2 ff) + 11 attentions x (proj_in, proj_out);
    # 12 + 32 CLIP layers x 4 attention projections
    assert len(by_part["unet"]) == 70 * 10 + 11 * 2 + locon == 722 + locon
    assert (len(by_part["te1"]), len(by_part["te2"])) == (12 * 4, 32 * 4)

    # 1. the original (SGM) layout: every name is a module of the full-size SDXL checkpoint
    flat = {p: {n.replace(".", "_"): n for n in names} for p, names in sgm.items() if p != "te2"}
    unmatched_sgm = [m for m in by_part["unet"] if m[len("lora_unet_"):] not in flat["unet"]]
    unmatched_sgm += [m for m in by_part["te1"] if m[len("lora_te1_"):] not in flat["te1"]]
    hf_te2 = {n.replace(".", "_"): n for n, _ in bundle.text_encoder_2.named_modules()}
    unmatched_sgm += [m for m in by_part["te2"] if m[len("lora_te2_"):] not in hf_te2
                      or _openclip_name(hf_te2[m[len("lora_te2_"):]]) not in sgm["te2"]]

    # 2. the diffusers layout, through diffusers' own kohya -> diffusers conversion (must consume every key)
    converted = _maybe_map_sgm_blocks_to_diffusers(dict(sd), bundle.unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(converted)   # raises on any leftover key
    peft_unet = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()
                                                 if k.startswith("unet.")})
    targets = {n for n, _ in lora_layers(bundle.unet)}
    theirs_unet = {k.rsplit(".lora_", 1)[0] for k in peft_unet}
    unet_modules = dict(bundle.unet.named_modules())
    unmatched_diffusers = sorted(theirs_unet ^ targets) + [n for n in theirs_unet if n not in unet_modules]
    for part, module in (("text_encoder", bundle.text_encoder), ("text_encoder_2", bundle.text_encoder_2)):
        # the renaming diffusers' text-encoder reader applies next (load_lora_into_text_encoder)
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}))
        if not hasattr(module, "text_model"):
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        names = {k.rsplit(".lora_", 1)[0] for k in state}
        modules = dict(module.named_modules())
        unmatched_diffusers += sorted(names ^ {n for n, _ in lora_layers(module)})
        unmatched_diffusers += [n for n in names if n not in modules]
    print(f"full-size SDXL LoRA: {len(kohya_modules)} modules ({len(by_part['unet'])} unet, "
          f"{len(by_part['te1'])} te1, {len(by_part['te2'])} te2), {len(sd)} tensors; "
          f"unmatched SGM {len(unmatched_sgm)}, unmatched diffusers {len(unmatched_diffusers)}, "
          f"alphas {len(alphas)}")
    assert unmatched_sgm == [], unmatched_sgm[:5]
    assert unmatched_diffusers == [], unmatched_diffusers[:5]
    assert len(converted) == 2 * len(kohya_modules) and len(alphas) == len(kohya_modules)
    # and the map is the one sd_keys uses for checkpoints, spot-checked against SDXL's published layout
    assert sdxl_unet_module_path("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", bundle.unet.config) \
        == "input_blocks.5.1.transformer_blocks.1.attn2.to_k"
    assert sdxl_unet_module_path("up_blocks.0.attentions.2.proj_out", bundle.unet.config) == "output_blocks.2.1.proj_out"
    assert sdxl_unet_module_path("mid_block.attentions.0.transformer_blocks.9.ff.net.2", bundle.unet.config) \
        == "middle_block.1.transformer_blocks.9.ff.net.2"
    for diffusers, sgm in (("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),       # LoCon's layers
                           ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
                           ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
                           ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
                           ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv")):
        assert sdxl_unet_module_path(diffusers, bundle.unet.config) == sgm
    assert check_kohya(sd, {"ss_base_model_version": "sdxl_base_v1-0"})[-1].startswith("metadata missing")
    assert not [p for p in check_kohya(sd, {"ss_base_model_version": "sdxl_base_v1-0"}) if "module name" in p]


def test_sdxl_locon_names_are_kohyas_sgm_resblock_and_sampler_layers(adapted_locon, tmp_path):
    bundle, spec = adapted_locon
    sd = kohya_state_dict(bundle, spec)
    for name, kernel in (("lora_unet_input_blocks_1_0_in_layers_2", (3, 3)), ("lora_unet_input_blocks_3_0_op", (3, 3)),
                         ("lora_unet_middle_block_2_out_layers_3", (3, 3)),
                         ("lora_unet_output_blocks_2_2_conv", (3, 3)),
                         ("lora_unet_output_blocks_0_0_skip_connection", (1, 1))):
        assert tuple(sd[f"{name}.lora_down.weight"].shape[2:]) == kernel, name
        assert float(sd[f"{name}.alpha"]) == (1.5 if kernel == (3, 3) else 2.0)
    assert "lora_unet_middle_block_0_emb_layers_1.lora_down.weight" in sd
    assert not any("resnets" in k or "samplers" in k for k in sd)           # SGM names only, as kohya-ss writes
    info = inspect_lora(save_kohya_lora(tmp_path / "xl_locon.safetensors", bundle, spec, "xl_locon"))
    assert info["compatible"], info["problems"]
    assert (info["kind"], info["rank"], info["conv_rank"], info["conv_alpha"]) == ("sdxl", 4, 3, 1.5)
