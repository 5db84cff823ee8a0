"""kohya export: an independent reader (diffusers' own converter) must reproduce the trained model exactly."""
import hashlib
import json
import re
import struct

import pytest
import torch

from iddm_core.errors import InputError
from iddm_core.training.finetune import DreamBoothTrainer, FinetuneConfig
from iddm_core.training.kohya import METADATA_KEYS, kohya_state_dict, save_kohya_lora
from iddm_core.training.kohya_check import check_kohya, inspect_lora, read_kohya_lora
from iddm_core.training.lora import LoraSpec, add_lora, get_lora_state, lora_disabled, lora_layers, set_lora_state
from iddm_core.diffusion.tiny import build_tiny_bundle

KOHYA_RE = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
SPEC = dict(rank=4, alpha=2.0, include_proj=True, include_ff=True, train_text_encoder=True)


@pytest.fixture(scope="module")
def trained():
    """Tiny model + LoRA on every supported target (incl. 1x1-conv proj_in/out and the text encoder)."""
    bundle = build_tiny_bundle(0)
    spec = LoraSpec(**SPEC)
    trainer = DreamBoothTrainer(bundle, spec, FinetuneConfig(lr=3e-2, prior_preservation=False))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    trainer.train(x, 4)
    return bundle, spec


LOCON = dict(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5)


def _is_conv3(layer) -> bool:
    return tuple(getattr(layer.get_base_layer(), "kernel_size", (1, 1))) == (3, 3)


@pytest.fixture(scope="module")
def locon_trained():
    """Tiny model + LoCon: attention LoRA plus the ResBlock / sampler layers, trained a few steps."""
    bundle = build_tiny_bundle(0)
    spec = LoraSpec(**LOCON)
    trainer = DreamBoothTrainer(bundle, spec, FinetuneConfig(lr=3e-2, prior_preservation=False))
    trainer.train(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), 4)
    return bundle, spec


def fresh_pipeline():
    from diffusers import StableDiffusionPipeline

    f = build_tiny_bundle(0)
    return StableDiffusionPipeline(vae=f.vae, text_encoder=f.text_encoder, tokenizer=f.tokenizer, unet=f.unet,
                                   scheduler=f.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def fixed_inputs(bundle):
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    ids = bundle.tokenizer(["a photo of sks person"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    return latents, context, ids


@torch.no_grad()
def outputs(unet, text_encoder, inputs):
    latents, context, ids = inputs
    return unet(latents, torch.tensor([500, 20]), encoder_hidden_states=context).sample, text_encoder(ids)[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float16, 2e-2)])
@pytest.mark.parametrize("which", ["trained", "locon_trained"])
def test_diffusers_kohya_loader_reproduces_trained_model(request, which, tmp_path, dtype, tol):
    """Plain LoRA (UNet + text encoder) and LoCon (UNet with its ResBlock / sampler layers)."""
    from peft.tuners.lora import LoraLayer

    bundle, spec = request.getfixturevalue(which)
    path = save_kohya_lora(tmp_path / "mine.safetensors", bundle, spec, "mine", dtype=dtype)
    pipe = fresh_pipeline()
    inputs = fixed_inputs(bundle)
    base_unet, base_te = outputs(pipe.unet, pipe.text_encoder, inputs)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    ours_unet, ours_te = outputs(bundle.unet, bundle.text_encoder, inputs)
    theirs_unet, theirs_te = outputs(pipe.unet, pipe.text_encoder, inputs)
    # the LoRA must matter, otherwise equality proves nothing
    assert (ours_unet - base_unet).abs().max() > 0.05
    assert (ours_te - base_te).abs().max() > 0.05 or not spec.train_text_encoder
    assert (ours_unet - theirs_unet).abs().max() < tol
    assert (ours_te - theirs_te).abs().max() < tol
    # diffusers put a LoRA on every UNet layer we did (LoCon: the convs too), and those convs matter
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(list(lora_layers(bundle.unet)))
    convs = [layer for _, layer in lora_layers(bundle.unet) if _is_conv3(layer)]
    for layer in convs:
        layer.enable_adapters(False)
    without_convs = outputs(bundle.unet, bundle.text_encoder, inputs)[0]
    for layer in convs:
        layer.enable_adapters(True)
    print(f"{which}: max |ours - diffusers| {float((ours_unet - theirs_unet).abs().max()):.2e}, "
          f"{len(convs)} 3x3 conv LoRAs, their effect {float((ours_unet - without_convs).abs().max()):.3f}")
    assert bool(convs) == bool(spec.conv_rank)
    assert (ours_unet - without_convs).abs().max() > 0.01 or not convs


def test_keys_shapes_and_scale(trained):
    bundle, spec = trained
    sd = kohya_state_dict(bundle, spec)
    assert all(KOHYA_RE.match(k) for k in sd), [k for k in sd if not KOHYA_RE.match(k)][:3]
    assert not any(k.startswith("lora_te1_") or "lora_A" in k or "lora_B" in k for k in sd)
    names = {k.split(".")[0] for k in sd}
    te = sorted(n for n in names if n.startswith("lora_te_"))
    assert te[0].startswith("lora_te_text_model_encoder_layers_0_self_attn_")
    assert len(te) == 2 * 4  # 2 layers x q, k, v, out
    conv = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert conv.dim() == 4 and tuple(conv.shape[2:]) == (1, 1)
    # kohya's delta (up @ down * alpha / dim) equals the PEFT layer's actual effect
    layer = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
    assert float(alpha) == spec.alpha and down.shape[0] == spec.rank
    x = torch.randn(3, down.shape[1])
    with torch.no_grad():
        effect = layer(x) - layer.base_layer(x)
    kohya = x @ (up @ down).T * (float(alpha) / down.shape[0])
    assert torch.allclose(effect, kohya, atol=1e-5) and effect.abs().max() > 1e-3


def _independent_hashes(path):
    """Re-derive kohya's sshs hashes: serialise tensors + ss_* metadata, hash bytes after the header."""
    from safetensors.torch import load_file, save

    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    ss_meta = {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_")}
    blob = save(load_file(str(path)), ss_meta)
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(blob[1 << 20:(1 << 20) + (1 << 16)]).hexdigest()[:8]


def test_metadata_and_hashes(tmp_path):
    bundle = build_tiny_bundle(0)
    spec = LoraSpec(rank=64, alpha=16, include_ff=True)  # big enough (> 1 MiB in fp32) for the legacy hash
    add_lora(bundle, spec)
    path = save_kohya_lora(tmp_path / "big.safetensors", bundle, spec, "big", comment="baseline", dtype=torch.float32)
    assert path.stat().st_size > (1 << 20) + (1 << 16)
    info = inspect_lora(path)
    meta = info["metadata"]
    assert sorted(meta) == sorted(METADATA_KEYS)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "64"
    # the tiny model is no real SD1 checkpoint: custom labels (a real one's: tests/test_a1111_items.py)
    assert float(meta["ss_network_alpha"]) == 16.0 and meta["ss_v2"] == "True"
    assert meta["ss_base_model_version"] == "iddm_custom_sd_v1"
    assert meta["modelspec.architecture"] == "iddm-custom-stable-diffusion-v1/lora" and info["custom_base"]
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["ss_output_name"] == "big"
    model_hash, legacy = _independent_hashes(path)
    assert meta["sshs_model_hash"] == model_hash
    assert meta["sshs_legacy_hash"] == legacy != hashlib.sha256(b"").hexdigest()[:8]
    assert info["compatible"] and info["rank"] == 64 and info["alpha"] == 16.0
    assert info["modules"] == {"unet": 10 * 10, "te": 0}  # 10 transformer blocks x (8 attn + 2 ff)


def test_v_model_metadata(tmp_path):
    bundle = build_tiny_bundle(0)
    bundle.kind, bundle.prediction_type = "sd2v", "v_prediction"
    spec = LoraSpec(rank=2)
    add_lora(bundle, spec)
    meta = inspect_lora(save_kohya_lora(tmp_path / "v.safetensors", bundle, spec, "v"))["metadata"]
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.prediction_type"]) == \
        ("iddm_custom_sd_v2_v", "True", "v")
    assert meta["modelspec.architecture"] == "iddm-custom-stable-diffusion-v2-768-v/lora"


def test_refuses_overwrite_and_bad_name(trained, tmp_path):
    bundle, spec = trained
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(InputError, match="x.safetensors"):
        save_kohya_lora(target, bundle, spec, "x")
    assert target.read_bytes() == b"keep"
    save_kohya_lora(target, bundle, spec, "x", overwrite=True)
    assert inspect_lora(target)["compatible"]
    with pytest.raises(InputError):
        save_kohya_lora(tmp_path / "y.safetensors", bundle, spec, "../y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_inspect_flags_peft_keys(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 5)}, str(bad))
    info = inspect_lora(bad)
    assert not info["compatible"]
    text = " ".join(info["problems"])
    assert "not in kohya form" in text and "alpha missing" in text and "do not chain" in text and "metadata" in text


def test_state_round_trip_and_disable(trained):
    bundle, spec = trained
    state = get_lora_state(bundle)
    inputs = fixed_inputs(bundle)
    before = outputs(bundle.unet, bundle.text_encoder, inputs)[0]
    with torch.no_grad():
        for p in bundle.unet.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert not torch.allclose(outputs(bundle.unet, bundle.text_encoder, inputs)[0], before)
    set_lora_state(bundle, state)
    assert torch.equal(outputs(bundle.unet, bundle.text_encoder, inputs)[0], before)
    with lora_disabled(bundle):
        base = outputs(bundle.unet, bundle.text_encoder, inputs)[0]
    fresh = build_tiny_bundle(0)
    assert torch.allclose(base, outputs(fresh.unet, fresh.text_encoder, inputs)[0], atol=1e-6)
    from iddm_core.training.lora import lora_parameters

    assert all(p.requires_grad for p in lora_parameters(bundle))  # trainable again after the context
    assert sum(p.requires_grad for p in bundle.unet.parameters()) == 2 * 10 * 12  # 10 blocks x 12 targets
    with pytest.raises(Exception, match="does not match"):
        set_lora_state(bundle, {k: v for k, v in list(state.items())[1:]})


# ---------------------------------------------------------------- full-size naming (what front ends address)
# Where SD 1.x/2.x keep their 16 transformer blocks in the original single-file layout. A1111 and kohya hard-code
# this layout (2 resnets per down block, 3 per up block), so a name that lands anywhere else is skipped there.
SD_LDM_ATTENTIONS = ([f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
                     + [f"output_blocks.{n}.1" for n in range(3, 12)])
ATTN_LEAVES = [f"transformer_blocks.0.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
EXTRA_LEAVES = ["proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]


def _full_size_export_names(kind, spec):
    """(kohya module names our exporter writes, kohya UNet name -> diffusers path) for a full-size SD1/SD2.

    The model is built on the meta device and given uninitialised CPU storage (no weights computed), so this
    costs seconds; only the LoRA tensors are ever read.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iddm_core.diffusion.bundle import ModelBundle
    from iddm_core.diffusion.reading import shipped_configs

    cfg = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in shipped_configs(kind).items()}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    unet.to_empty(device="cpu")
    text_encoder.to_empty(device="cpu")
    bundle = ModelBundle(unet=unet, vae=torch.nn.Identity(), text_encoder=text_encoder, tokenizer=None,
                         noise_scheduler=None, kind=kind, prediction_type="epsilon", resolution=512, title=kind)
    add_lora(bundle, spec)
    names = {k.split(".")[0] for k in kohya_state_dict(bundle, spec)}
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}
    return names, paths, cfg


@pytest.mark.parametrize("kind,extra,te_layers", [("sd1", False, 12), ("sd2", True, 23)])
def test_full_size_names_are_the_original_layout_modules(kind, extra, te_layers):
    """Every UNet name maps onto the SD original-layout attention modules (all of them, nothing else), and the
    text-encoder names use the transformers-4 ``text_model.`` path every front end expects."""
    from iddm_core import sd_keys

    spec = LoraSpec(rank=4, include_proj=extra, include_ff=extra, train_text_encoder=True)
    names, paths, cfg = _full_size_export_names(kind, spec)
    unet_names = sorted(n for n in names if n.startswith("lora_unet_"))
    leaves = ATTN_LEAVES + (EXTRA_LEAVES if extra else [])
    expected = {f"diffusion_model.{block}.{leaf}" for block in SD_LDM_ATTENTIONS for leaf in leaves}
    ldm = {sd_keys.unet_key_to_ldm(paths[n] + ".weight", cfg["unet"])[len("model."):-len(".weight")]
           for n in unet_names}
    assert len(unet_names) == len(expected) == 16 * len(leaves)
    assert ldm == expected, sorted(ldm ^ expected)[:4]
    te_expected = {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj"
                   for i in range(te_layers) for p in ("q", "k", "v", "out")}
    assert {n for n in names if n.startswith("lora_te_")} == te_expected
    assert len(names) == len(unet_names) + len(te_expected)


# ---------------------------------------------------------------- LoCon (kohya conv_dim / conv_alpha)

def test_locon_file_names_metadata_and_inspection(locon_trained, tmp_path):
    bundle, spec = locon_trained
    sd = kohya_state_dict(bundle, spec)
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_mid_block_resnets_1_conv2",
                 "lora_unet_down_blocks_1_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        assert tuple(down.shape[::2]) == (3, 3) and tuple(up.shape[2:]) == (1, 1), name   # 3x3 down, 1x1 up
        assert down.shape[0] == 3 and float(sd[f"{name}.alpha"]) == 1.5
    for name in ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_0_resnets_0_time_emb_proj"):
        assert sd[f"{name}.lora_down.weight"].shape[0] == 4 and float(sd[f"{name}.alpha"]) == 2.0   # network dim
    assert not any("lora_mid" in k for k in sd)
    path = save_kohya_lora(tmp_path / "locon.safetensors", bundle, spec, "locon")
    info = inspect_lora(path)
    assert info["compatible"], info["problems"]
    assert (info["rank"], info["alpha"], info["conv_rank"], info["conv_alpha"]) == (4, 2.0, 3, 1.5)
    assert json.loads(info["metadata"]["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    assert info["metadata"]["ss_network_dim"] == "4"
    tensors, meta = read_kohya_lora(path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
    flat = dict(tensors, **{conv: tensors[conv][:, :, 1:2, 1:2].contiguous()})         # a 1x1 down on a 3x3 conv
    assert any("is not 3x3" in p for p in check_kohya(flat, meta))
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wide = dict(tensors, **{f"{attn}.lora_down.weight": torch.zeros(4, 32, 3, 3),
                            f"{attn}.lora_up.weight": torch.zeros(32, 4, 1, 1)})
    assert any("not a 3x3 conv" in p for p in check_kohya(wide, meta))


def test_locon_is_opt_in_and_checked(tmp_path):
    plain = LoraSpec(rank=4)
    assert plain.conv_rank == 0 and plain.conv_alpha is None and plain.unet_patterns() == ({}, {})
    assert plain.unet_modules() == ["to_q", "to_k", "to_v", "to_out.0"]
    assert LoraSpec(rank=4, conv_rank=2).conv_alpha == 2.0                       # conv_alpha = conv_rank by default
    for bad, word in ((dict(conv_alpha=2.0), "conv_alpha"), (dict(conv_rank=-1), "conv_rank"),
                      (dict(conv_rank=2, conv_alpha=0), "conv_alpha"), (dict(conv_rank=1.5), "conv_rank")):
        with pytest.raises(InputError, match=word):
            LoraSpec(rank=4, **bad)
    bundle = build_tiny_bundle(0)
    add_lora(bundle, plain)
    assert not any(_is_conv3(layer) for _, layer in lora_layers(bundle.unet))
    info = inspect_lora(save_kohya_lora(tmp_path / "plain.safetensors", bundle, plain, "plain"))
    assert "ss_network_args" not in info["metadata"] and (info["conv_rank"], info["conv_alpha"]) == (0, None)


def test_resume_fingerprint_leaves_default_conv_settings_out():
    """A state written before conv_rank existed still matches a run that leaves LoCon off; LoCon is another run."""
    import dataclasses

    from iddm_core.protection.iddm import IDDMConfig
    from iddm_core.training import checkpoint as ckpt

    class Refs:
        def reference(self):
            return torch.zeros(1, 3, 8, 8), torch.zeros(1, 5, 2)

        protect = reference

    class OldConfig(IDDMConfig):          # what to_dict gave before the LoCon fields existed
        def to_dict(self):
            return {k: v for k, v in super().to_dict().items() if k not in ("conv_rank", "conv_alpha")}

    bundle = build_tiny_bundle(0)
    old = ckpt.run_fingerprint(bundle, Refs(), OldConfig())
    assert ckpt.run_fingerprint(bundle, Refs(), IDDMConfig()) == old
    locon = ckpt.run_fingerprint(bundle, Refs(), dataclasses.replace(IDDMConfig(), conv_rank=4))
    assert locon["parts"]["settings"] != old["parts"]["settings"]
    state = {"version": ckpt.FORMAT_VERSION, "fingerprint": old}
    assert ckpt.differences(state, locon) == ["settings differ (conv_rank)"]


def test_front_ends_pass_locon_on():
    """CLI train / finetune, the nodes' and the tab's shared config: conv_rank reaches the run; bad values name it."""
    from iddm_core import frontend
    from iddm_core.cli import build_parser
    from iddm_core.cli.iddm import config_from_args
    from iddm_core.protection.pgd import PGDConfig

    args = build_parser().parse_args(["train", "--refs", "x", "--out", "y.safetensors", "--conv-rank", "8",
                                      "--conv-alpha", "4"])
    config = config_from_args(args)
    assert (config.conv_rank, config.conv_alpha) == (8, 4.0)
    assert config_from_args(build_parser().parse_args(["train", "--refs", "x", "--out", "y"])).conv_rank == 0
    with pytest.raises(InputError, match="conv_alpha"):
        config_from_args(build_parser().parse_args(["train", "--refs", "x", "--out", "y", "--conv-alpha", "4"]))
    fine = build_parser().parse_args(["finetune", "--refs", "x", "--out", "y.safetensors", "--conv-rank", "2"])
    assert (fine.conv_rank, fine.conv_alpha) == (2, None)
    common = dict(surrogates=("dlib",), tau=0.03)
    made = frontend.iddm_config(PGDConfig(), 1, 2, 4, 1e-4, 0, 0, False, 1, conv_rank=6, **common)
    assert made.conv_rank == 6 and made.conv_alpha is None
    assert frontend.iddm_config(PGDConfig(), 1, 2, 4, 1e-4, 0, 0, False, 1, **common).conv_rank == 0
    with pytest.raises(InputError, match="conv_rank"):
        frontend.iddm_config(PGDConfig(), 1, 2, 4, 1e-4, 0, 0, False, 1, conv_rank=-1, **common)
