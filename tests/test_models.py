"""Model loading: tiny model, diffusers folder and single-file loaders agree; kind detection; clear errors."""
import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from iddm_core.errors import ModelError
from iddm_core.models import (ModelBundle, detect_kind, load_model, read_checkpoint, resolve_tokenizer,
                              save_single_file)
from iddm_core import models as models_mod
from iddm_core.tiny import build_tiny_bundle, write_tiny_model, write_tiny_tokenizer

REAL_COMFY_DIR = models_mod.comfy_tokenizer_dir
PROMPTS = ["a photo of sks person", "a photo of person"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (loading must be purely local)."""
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(models_mod, "comfy_tokenizer_dir", lambda kind: None)  # no ComfyUI unless a test says so
    yield attempts
    assert not attempts


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    folder, single = write_tiny_model(out)
    return folder, single


def _ids(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def _outputs(bundle: ModelBundle, ids):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(ids), 4, 8, 8, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g)
    hidden = bundle.text_encoder(ids)[0]
    eps = bundle.unet(latents, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample
    z = bundle.vae.encode(images).latent_dist.mean
    return hidden, eps, z, bundle.vae.decode(z).sample


def _assert_same_outputs(a, b, ids):
    for x, y in zip(_outputs(a, ids), _outputs(b, ids)):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5), (x - y).abs().max()


# ------------------------------------------------------------------------------------------------ tiny
def test_tiny_bundle_is_deterministic_sd1_shaped_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_bundle(0)
    assert torch.equal(torch.rand(3), expected_next)       # building did not consume the global RNG
    b, c = build_tiny_bundle(0), build_tiny_bundle(1)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a.kind, a.prediction_type, a.resolution, a.title) == ("sd1", "epsilon", 64, "tiny")
    assert a.vae_scale_factor == 8 and a.latent_size == 8 and a.scaling_factor == pytest.approx(0.18215)
    cfg = a.unet.config
    assert list(cfg.down_block_types).count("CrossAttnDownBlock2D") == 3 and len(cfg.down_block_types) == 4
    assert cfg.down_block_types[-1] == "DownBlock2D" and cfg.layers_per_block <= 2
    assert sum(p.numel() for p in a.unet.parameters()) < 3_000_000


def test_tiny_tokenizer_gives_one_token_per_prompt_word():
    tok = build_tiny_bundle(0).tokenizer
    for prompt in PROMPTS:
        tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
        assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in prompt.split()] + ["<|endoftext|>"]
    # unknown words still tokenize (byte fallback), case is folded
    assert tok("SKS Person").input_ids == tok("sks person").input_ids
    assert len(tok("zebra").input_ids) > 3


def test_load_model_tiny_device_dtype():
    b = load_model("tiny", dtype=torch.float64)
    assert b.dtype == torch.float64 and b.device.type == "cpu"
    assert next(b.text_encoder.parameters()).dtype == torch.float64


# --------------------------------------------------------------------------------------------- loaders
def test_diffusers_folder_and_single_file_match_in_memory_tiny(written):
    folder, single = written
    ref = load_model("tiny")
    from_folder = load_model(str(folder))
    from_file = load_model(str(single), tokenizer=str(folder / "tokenizer"))
    ids = _ids(ref.tokenizer)
    for b in (from_folder, from_file):
        assert (b.kind, b.prediction_type, b.resolution, b.title) == ("sd1", "epsilon", 64, "tiny")
        assert torch.equal(_ids(b.tokenizer), ids)
        assert b.noise_scheduler.config.num_train_timesteps == 1000
        _assert_same_outputs(ref, b, ids)


def test_single_file_is_in_original_sd1_layout(written):
    state, metadata = read_checkpoint(written[1])
    keys = set(state)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in keys
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks", "text_model.")) for k in keys)
    assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") for k in keys)
    assert metadata["iddm.kind"] == "sd1"


def test_pickle_state_dict_loads_with_weights_only(written, tmp_path):
    state, _ = read_checkpoint(written[1])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    loaded, _ = read_checkpoint(ckpt)
    assert set(loaded) == set(state) and detect_kind(loaded, str(ckpt)) == "sd1"


@pytest.mark.parametrize("kind", ["sd2", "sd2v"])
def test_sd2_openclip_single_file_roundtrip(tmp_path, kind):
    bundle = build_tiny_bundle(3, kind=kind)
    path = save_single_file(bundle, tmp_path / "whatever_sd1_name.safetensors")
    state, _ = read_checkpoint(path)
    assert any(k.endswith("transformer.resblocks.0.attn.in_proj_weight") for k in state)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    tok_dir = write_tiny_tokenizer(tmp_path / "tok")
    loaded = load_model(str(path), tokenizer=str(tok_dir))
    assert loaded.kind == kind                     # from the tensors, not from the (misleading) file name
    assert loaded.prediction_type == ("v_prediction" if kind == "sd2v" else "epsilon")
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type
    assert loaded.text_encoder.config.num_hidden_layers == bundle.text_encoder.config.num_hidden_layers
    _assert_same_outputs(bundle, loaded, _ids(bundle.tokenizer))


# ---------------------------------------------------------------------------------------------- detection
def _shapes(context_dim, text="clip"):
    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context_dim)}
    if text == "clip":
        keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (768,)
    elif text == "openclip":
        keys["cond_stage_model.model.ln_final.weight"] = (1024,)
    return keys


def test_detect_kind_from_real_distinguishing_shapes():
    assert detect_kind(_shapes(768)) == "sd1"
    assert detect_kind(_shapes(1024, "openclip")) == "sd2"
    assert detect_kind(_shapes(1024, None)) == "sd2"        # UNet-only file: context width decides
    assert detect_kind(_shapes(768, None)) == "sd1"
    assert detect_kind(_shapes(1024, "openclip"), metadata={"modelspec.prediction_type": "v"}) == "sd2v"
    with pytest.raises(ModelError, match="kind="):
        detect_kind(_shapes(320, None), source="x.safetensors")


def test_v_prediction_heuristic_on_norm_bias_spread():
    g = torch.Generator().manual_seed(0)
    state = {k: torch.zeros(v) for k, v in _shapes(1024, "openclip").items()}
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[key] = torch.randn(640, generator=g) * 0.02
    assert detect_kind(state) == "sd2"
    state[key] = torch.randn(640, generator=g) * 0.3
    assert detect_kind(state) == "sd2v"


def test_kind_override_beats_detection(tmp_path):
    bundle = build_tiny_bundle(0, kind="sd2v")
    path = save_single_file(bundle, tmp_path / "v.safetensors")
    tok = write_tiny_tokenizer(tmp_path / "tok")
    loaded = load_model(str(path), kind="sd2", tokenizer=str(tok))
    assert loaded.kind == "sd2" and loaded.prediction_type == "epsilon"
    with pytest.raises(ModelError, match="kind="):
        load_model(str(path), kind="sdxl", tokenizer=str(tok))


# ------------------------------------------------------------------------------------------------ errors
def test_missing_tokenizer_says_where_to_put_it(written):
    with pytest.raises(ModelError) as err:
        load_model(str(written[1]))
    msg = str(err.value)
    assert written[1].name in msg and "vocab.json" in msg and "merges.txt" in msg and "tokenizer=" in msg


def test_bad_tokenizer_folder_is_named(written, tmp_path):
    with pytest.raises(ModelError, match="tokenizer=.*empty"):
        (tmp_path / "empty").mkdir()
        load_model(str(written[1]), tokenizer=str(tmp_path / "empty"))


def test_comfy_bundled_tokenizer_is_used_and_sd2_pads_with_bang(written, tmp_path, monkeypatch):
    comfy_tok = write_tiny_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")   # vocab.json + merges.txt only
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models_mod, "comfy_tokenizer_dir", REAL_COMFY_DIR)   # a fake `comfy` package is importable
    assert models_mod.comfy_tokenizer_dir("sd1") == comfy_tok
    b = load_model(str(written[1]))
    assert torch.equal(_ids(b.tokenizer), _ids(build_tiny_bundle(0).tokenizer))
    assert resolve_tokenizer("sd2").pad_token == "!"


def test_comfy_tokenizer_max_length_8192_is_capped_to_clip_context(written, tmp_path, monkeypatch):
    # ComfyUI's real comfy/sd1_tokenizer/tokenizer_config.json says model_max_length 8192; padding prompts to
    # that length overflows the text encoder's 77 positions (found running the node pack in a real ComfyUI).
    comfy_tok = write_tiny_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")
    cfg_path = comfy_tok / "tokenizer_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"model_max_length": 77', '"model_max_length": 8192'))
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models_mod, "comfy_tokenizer_dir", REAL_COMFY_DIR)
    b = load_model(str(written[1]))
    assert b.tokenizer.model_max_length == 77
    from iddm_core.finetune import encode_prompts
    assert encode_prompts(b, ["a photo of sks person"]).shape[1] == 77


def test_unknown_layout_names_the_file(tmp_path):
    path = tmp_path / "random_keys.safetensors"
    save_file({"foo.bar": torch.zeros(2), "baz": torch.ones(3, 3)}, str(path))
    with pytest.raises(ModelError, match="random_keys.safetensors.*unknown checkpoint layout"):
        load_model(str(path))


def test_sdxl_and_corrupt_files_are_refused(tmp_path):
    sdxl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
               "conditioner.embedders.0.transformer.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(ModelError, match="xl.safetensors.*SDXL"):
        load_model(str(sdxl))
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="broken.safetensors"):
        load_model(str(corrupt))


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(ModelError, match="nope.safetensors"):
        load_model(str(tmp_path / "nope.safetensors"))
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelError, match="model.onnx"):
        load_model(str(odd))
    (tmp_path / "notdiffusers").mkdir()
    with pytest.raises(ModelError, match="notdiffusers.*unet/"):
        load_model(str(tmp_path / "notdiffusers"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_carrying_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(ModelError, match="evil.ckpt.*weights_only"):
        load_model(str(path))


def test_wrong_architecture_is_a_model_error(written, tmp_path):
    state, _ = read_checkpoint(written[1])
    path = tmp_path / "tiny_without_meta.safetensors"
    save_file(state, str(path))           # no iddm.configs metadata -> the real SD1 config is used
    with pytest.raises(ModelError, match="tiny_without_meta.safetensors.*sd1 architecture"):
        load_model(str(path), tokenizer=str(written[0] / "tokenizer"))


# -------------------------------------------------------------------------------------------- offline, CLI
def test_loading_needs_no_hub_cache(written, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    b = load_model(str(written[0]))
    assert b.title == "tiny"
    assert not (tmp_path / "empty_hf_home" / "hub").exists() or not any((tmp_path / "empty_hf_home" / "hub").iterdir())


def test_cli_writes_both_and_refuses_to_overwrite(tmp_path, capsys):
    from iddm_core.cli import main

    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "tiny" / "model_index.json").is_file()
    assert (tmp_path / "m" / "tiny.safetensors").is_file()
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert main(["tiny-model", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before   # no temp leftovers


@pytest.mark.parametrize("kind,unet_m,text_m", [("sd1", 859, 123), ("sd2", 865, 340), ("sd2v", 865, 340)])
def test_shipped_configs_describe_the_real_architectures(kind, unet_m, text_m):
    """Built on the meta device (no memory): parameter counts match the published SD models (millions)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = models_mod.shipped_configs(kind)
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean(cfg["unet"]))
        vae = AutoencoderKL.from_config(clean(cfg["vae"]))
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(unet) == pytest.approx(unet_m, abs=2)
    assert count(vae) == pytest.approx(83.65, abs=0.5)
    assert count(text) == pytest.approx(text_m, abs=2)
    assert cfg["scheduler"]["prediction_type"] == models_mod.PREDICTION_TYPES[kind]
    assert cfg["vae"]["sample_size"] == models_mod.RESOLUTIONS[kind]
