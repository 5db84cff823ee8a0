"""Every key of our kohya files loads in ComfyUI's and A1111's built-in LoRA loaders (their key maps restated in
lora_loaders.py, with the source commits), plain LoRA and LoCon, SD1 / SD2 / SDXL; and what ComfyUI applies is the
trained change of each layer."""
import pytest
import torch

from iddm_core.diffusion import sd_keys
from iddm_core.diffusion.tiny import build_tiny_bundle
from iddm_core.training.kohya import kohya_module_name, kohya_state_dict
from iddm_core.training.lora import ADAPTER, LoraSpec, add_lora, lora_layers, model_parts
from lora_loaders import a1111_unet_module, comfy_delta, comfy_key_map, comfy_unet_to_diffusers, comfy_unloaded

LOCON = dict(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5, include_proj=True, include_ff=True,
             train_text_encoder=True)


def _fill(bundle, seed: int = 3) -> None:
    """Non-zero LoRA weights everywhere (lora_B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model_parts(bundle):
            for _, layer in lora_layers(module):
                for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def _ldm_weights(bundle) -> dict[str, tuple]:
    """Original-layout UNet weight path (no ``diffusion_model.``, no ``.weight``) -> shape, as a checkpoint holds."""
    ldm = sd_keys.unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config)
    start = len(sd_keys.UNET_PREFIX)
    return {k[start:-len(".weight")]: tuple(v.shape) for k, v in ldm.items() if k.endswith(".weight")}


def _te_layers(bundle) -> dict[str, int]:
    return {part: m.config.num_hidden_layers for part, m in model_parts(bundle)[1:]}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_comfyui_loads_every_key_of_a_tiny_locon_file_and_applies_the_trained_change(kind):
    bundle = build_tiny_bundle(0, kind)
    weights = _ldm_weights(bundle)                 # of the base model, before PEFT wraps its layers
    spec = LoraSpec(**LOCON)
    add_lora(bundle, spec)
    _fill(bundle)
    tensors = kohya_state_dict(bundle, spec)
    key_map = comfy_key_map(weights, bundle.unet.config, _te_layers(bundle), sdxl=kind == "sdxl")
    unloaded = comfy_unloaded(tensors, key_map)
    diffusers_map = comfy_unet_to_diffusers(bundle.unet.config)
    checked = convs = 0
    for part, module in model_parts(bundle):
        for name, layer in lora_layers(module):
            kohya = kohya_module_name(bundle, part, name)
            target_part, target = key_map[kohya]
            delta = layer.get_delta_weight(ADAPTER)
            if part == "unet":
                assert weights[target] == tuple(delta.shape), kohya      # the original weight it patches
                assert diffusers_map[name] == target, kohya              # SDXL: our SGM name = ComfyUI's own map
            else:
                assert int(target.split(".")[1]) < module.config.num_hidden_layers
            assert torch.allclose(comfy_delta(tensors, kohya, delta.shape), delta, atol=1e-5), kohya
            checked += 1
            convs += delta.dim() == 4 and tuple(delta.shape[2:]) == (3, 3)
    print(f"{kind}: {len(tensors)} keys, {checked} modules ({convs} 3x3 convs), ComfyUI unloaded {len(unloaded)}")
    assert unloaded == []
    assert checked == len(tensors) // 3 and convs > 0


def _full_size(kind: str, spec: LoraSpec):
    """Full-size UNet (+ text encoders) on the meta device with the LoRA materialised on the CPU; (bundle, kohya
    tensors, the base UNet's original-layout weight shapes). Seconds: no base weight is ever computed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iddm_core.diffusion.bundle import ModelBundle, clean_config
    from iddm_core.diffusion.reading import shipped_configs

    cfg = shipped_configs(kind)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean_config(cfg["unet"]))
        te = CLIPTextModel(CLIPTextConfig(**clean_config(cfg["text_encoder"])))
        te2 = CLIPTextModel(CLIPTextConfig(**clean_config(cfg["text_encoder_2"]))) if "text_encoder_2" in cfg else None
    bundle = ModelBundle(unet=unet, vae=torch.nn.Linear(1, 1), text_encoder=te, tokenizer=None, noise_scheduler=None,
                         kind=kind, prediction_type="epsilon", resolution=512, title=kind, text_encoder_2=te2)
    weights = _ldm_weights(bundle)
    add_lora(bundle, spec)
    for _, module in model_parts(bundle):
        for _, layer in lora_layers(module):
            for ab in (layer.lora_A, layer.lora_B):
                ab[ADAPTER].to_empty(device="cpu")
                torch.nn.init.ones_(ab[ADAPTER].weight)
    return bundle, kohya_state_dict(bundle, spec), weights


def _resblock_layers(config) -> tuple[int, int]:
    """(LoCon modules, of which 3x3 convs): the Linear/Conv2d children of the ResBlocks and samplers of a UNet
    of this config (a fresh one on the meta device, no LoRA in it)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = [m for block in unet.modules() if isinstance(block, (ResnetBlock2D, Downsample2D, Upsample2D))
              for m in block.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return len(layers), sum(getattr(m, "kernel_size", (1, 1)) == (3, 3) for m in layers)


# kind, (ResBlock + sampler modules, of which 3x3) of the real models: SD1/SD2 22 ResBlocks (conv1, conv2,
# time_emb_proj; 14 with a conv_shortcut) + 6 samplers; SDXL 17 ResBlocks (11 shortcuts) + 4 samplers
@pytest.mark.parametrize("kind,locon", [("sd1", (86, 50)), ("sd2", (86, 50)), ("sdxl", (66, 38))])
def test_full_size_locon_keys_load_in_comfyui_and_a1111(kind, locon):
    spec = LoraSpec(rank=2, conv_rank=2, train_text_encoder=True)
    bundle, tensors, weights = _full_size(kind, spec)
    plain = LoraSpec(rank=2, train_text_encoder=True).unet_modules()
    key_map = comfy_key_map(weights, bundle.unet.config, _te_layers(bundle), sdxl=kind == "sdxl")
    unloaded = comfy_unloaded(tensors, key_map)
    unet_names = sorted({k.split(".")[0] for k in tensors if k.startswith("lora_unet_")})
    unloaded += [n for n in unet_names if key_map[n][1] not in weights]      # a name for a weight not there
    compvis = {"diffusion_model_" + p.replace(".", "_"): shape for p, shape in weights.items()}
    a1111 = {n: a1111_unet_module(n, set(compvis)) for n in unet_names}
    missed = [n for n, target in a1111.items() if target is None]
    conv_names = [n for n in unet_names if tensors[f"{n}.lora_down.weight"].dim() == 4
                  and tuple(tensors[f"{n}.lora_down.weight"].shape[2:]) == (3, 3)]
    print(f"{kind} LoCon: {len(unet_names)} UNet modules ({len(conv_names)} 3x3), {len(tensors)} keys; "
          f"ComfyUI unloaded {len(unloaded)}, A1111 unmatched {len(missed)}")
    assert unloaded == [] and missed == [], (unloaded[:3], missed[:3])
    assert _resblock_layers(bundle.unet.config) == locon
    attention = sum(1 for n, _ in bundle.unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"))
    assert len(unet_names) == attention // 3 * 4 + locon[0] and len(conv_names) == locon[1]
    for name in conv_names:              # A1111: down keeps the layer's 3x3 kernel, up is 1x1, no lora_mid
        target = compvis[a1111[name]]
        assert tuple(tensors[f"{name}.lora_down.weight"].shape[1:]) == target[1:], name
        assert tuple(tensors[f"{name}.lora_up.weight"].shape[2:]) == (1, 1) and f"{name}.lora_mid.weight" not in tensors
    assert "to_q" in plain and not any("conv" in t for t in plain)     # LoCon is opt-in
