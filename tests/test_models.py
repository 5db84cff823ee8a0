"""Model loading: tiny model, diffusers folder and single-file loaders agree; kind detection; clear errors."""
import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from iddm_core.errors import ModelError
from iddm_core.diffusion import reading, single_file, tokenizers
from iddm_core.diffusion.bundle import ModelBundle
from iddm_core.diffusion.kinds import PREDICTION_TYPES, RESOLUTIONS, detect_kind
from iddm_core.diffusion.loading import load_model
from iddm_core.diffusion.reading import read_checkpoint, shipped_configs
from iddm_core.diffusion.tokenizers import check_tokenizer_fits, resolve_tokenizer
from iddm_core.diffusion.validation import ModelInfo, validate_model
from iddm_core.diffusion.writing import save_single_file
from iddm_core.diffusion.tiny import build_tiny_bundle, write_tiny_model, write_tiny_tokenizer

REAL_COMFY_DIR = tokenizers.comfy_tokenizer_dir
PROMPTS = ["a photo of sks person", "a photo of person"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (loading must be purely local)."""
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", lambda kind: None)  # no ComfyUI unless a test says so
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


def test_sd1_v_prediction_and_zero_terminal_snr_markers_round_trip(tmp_path):
    """An SD1 model with v-prediction on a zero-terminal-SNR schedule (the demo model) is written with ComfyUI's
    ``v_pred`` and ``ztsnr`` markers and loads back as such; the ``ztsnr`` marker alone switches the schedule."""
    from diffusers import DDPMScheduler

    from iddm_core.diffusion.kinds import ZERO_TERMINAL_SNR

    tok = str(write_tiny_tokenizer(tmp_path / "tok"))
    bundle = build_tiny_bundle(3)
    bundle.prediction_type = "v_prediction"
    config = {k: v for k, v in bundle.noise_scheduler.config.items() if not k.startswith("_")}
    bundle.noise_scheduler = DDPMScheduler.from_config({**config, **ZERO_TERMINAL_SNR, "prediction_type": "v_prediction"})
    path = save_single_file(bundle, tmp_path / "v.safetensors")
    state, metadata = read_checkpoint(path)
    assert "v_pred" in state and "ztsnr" in state
    loaded = load_model(str(path), tokenizer=tok)
    assert (loaded.kind, loaded.prediction_type) == ("sd1", "v_prediction")
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(loaded.noise_scheduler.alphas_cumprod[-1]) < 1e-6           # zero terminal SNR
    assert validate_model(str(path), tokenizer=tok).prediction_type == "v_prediction"

    plain = save_single_file(build_tiny_bundle(3), tmp_path / "eps.safetensors")
    state, metadata = read_checkpoint(plain)
    assert "v_pred" not in state and "ztsnr" not in state
    assert load_model(str(plain), tokenizer=tok).prediction_type == "epsilon"
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(tmp_path / "marked.safetensors"),
              metadata=metadata)
    marked = load_model(str(tmp_path / "marked.safetensors"), tokenizer=tok)
    assert marked.prediction_type == "v_prediction" and marked.noise_scheduler.config.rescale_betas_zero_snr
    assert marked.noise_scheduler.config.timestep_spacing == "trailing"


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


def test_unet_input_channels_must_match_the_vae_latents():
    """An inpainting UNet (9 = 4 latent + 4 masked-image + 1 mask channels) is refused; a UNet whose input matches
    its own VAE's latent channels (the demo model: 16) is an ordinary text-to-image model."""
    inpaint = {**_shapes(768), "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    with pytest.raises(ModelError, match="9 input channels for 4-channel latents"):
        detect_kind(inpaint, source="inpaint.safetensors")
    wide = {**_shapes(768), "model.diffusion_model.input_blocks.0.0.weight": (32, 16, 3, 3),
            "first_stage_model.post_quant_conv.weight": (16, 16, 1, 1)}
    assert detect_kind(wide) == "sd1"
    with pytest.raises(ModelError, match="16 input channels for 4-channel latents"):
        detect_kind({**wide, "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1)})


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
def test_missing_tokenizer_says_where_to_put_it(written, monkeypatch):
    # the pack's own files carry a built-in tokenizer (next tests); a foreign file with none found is told where
    monkeypatch.setattr(single_file, "carries_tiny_vocabulary", lambda *a: False)
    with pytest.raises(ModelError) as err:
        load_model(str(written[1]))
    msg = str(err.value)
    assert written[1].name in msg and "vocab.json" in msg and "merges.txt" in msg and "tokenizer=" in msg


def test_missing_demo_weights_name_the_file_and_how_to_make_them(tmp_path):
    from iddm_core.diffusion.loading import load_demo_bundle, load_demo_v2_bundle

    with pytest.raises(ModelError, match=r"demo model weights missing: .*demo\.safetensors .*iddm_core\.demo\.model train"):
        load_demo_bundle(tmp_path)
    with pytest.raises(ModelError, match=r"demo model v2 weights missing: .*gpu_train_demo_v2\.sh"):
        load_demo_v2_bundle(tmp_path)


def test_bad_tokenizer_folder_is_named(written, tmp_path):
    with pytest.raises(ModelError, match="tokenizer=.*empty"):
        (tmp_path / "empty").mkdir()
        load_model(str(written[1]), tokenizer=str(tmp_path / "empty"))


def test_comfy_bundled_tokenizer_is_used_and_sd2_pads_with_bang(written, tmp_path, monkeypatch):
    comfy_tok = write_tiny_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")   # vocab.json + merges.txt only
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", REAL_COMFY_DIR)   # a fake `comfy` package is importable
    assert tokenizers.comfy_tokenizer_dir("sd1") == comfy_tok
    b = load_model(str(written[1]))
    assert torch.equal(_ids(b.tokenizer), _ids(build_tiny_bundle(0).tokenizer))
    assert resolve_tokenizer("sd2").pad_token == "!"
    # an explicit CLIP ViT-L tokenizer folder (e.g. A1111's cache) pads SD2 prompts with "!" too, SD1's not
    assert resolve_tokenizer("sd2", tokenizer=comfy_tok).pad_token == "!"
    assert resolve_tokenizer("sd1", tokenizer=comfy_tok).pad_token == "<|endoftext|>"


def test_comfy_tokenizer_max_length_8192_is_capped_to_clip_context(written, tmp_path, monkeypatch):
    # ComfyUI's real comfy/sd1_tokenizer/tokenizer_config.json says model_max_length 8192; padding prompts to
    # that length overflows the text encoder's 77 positions (found running the node pack in a real ComfyUI).
    comfy_tok = write_tiny_tokenizer(tmp_path / "comfy" / "sd1_tokenizer")
    cfg_path = comfy_tok / "tokenizer_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"model_max_length": 77', '"model_max_length": 8192'))
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", REAL_COMFY_DIR)
    b = load_model(str(written[1]))
    assert b.tokenizer.model_max_length == 77
    from iddm_core.training.conditioning import encode_prompts
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

    cfg = shipped_configs(kind)
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean(cfg["unet"]))
        vae = AutoencoderKL.from_config(clean(cfg["vae"]))
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(unet) == pytest.approx(unet_m, abs=2)
    assert count(vae) == pytest.approx(83.65, abs=0.5)
    assert count(text) == pytest.approx(text_m, abs=2)
    assert cfg["scheduler"]["prediction_type"] == PREDICTION_TYPES[kind]
    assert cfg["vae"]["sample_size"] == RESOLUTIONS[kind]


# ------------------------------------------------------------------------ tokenizer / text encoder (issue 12)
def _write_padded_tokenizer(folder, size):
    """The tiny tokenizer's files with filler tokens so that it has ``size`` ids, the specials last (CLIP layout:
    a stand-in for ComfyUI's 49408-token comfy/sd1_tokenizer)."""
    import json

    from iddm_core.diffusion.tiny import tiny_vocab_and_merges

    write_tiny_tokenizer(folder)
    vocab, _ = tiny_vocab_and_merges()
    tokens = [t for t in vocab if not t.startswith("<|")]
    tokens += [f"filler{i}" for i in range(size - 2 - len(tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    return folder


def _fake_comfy(tmp_path, monkeypatch, size):
    tok = _write_padded_tokenizer(tmp_path / "comfy" / "sd1_tokenizer", size)
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tokenizers, "comfy_tokenizer_dir", REAL_COMFY_DIR)
    return tok


def _no_network_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network was built before the tokenizer was checked")

    monkeypatch.setattr(single_file, "_build_loaded", refuse)


def test_comfy_clip_tokenizer_on_tiny_text_encoder_is_a_clear_error_before_loading(written, tmp_path, monkeypatch):
    from iddm_core.diffusion.builtin import ASSET_DIR

    # In ComfyUI a single file whose text encoder has fewer token rows than comfy/sd1_tokenizer died at the first
    # prompt with "IndexError: index out of range in self". It must fail at load time, saying which tokenizer.
    _fake_comfy(tmp_path, monkeypatch, 49408)
    assert validate_model(str(written[1])).kind == "sd1"     # the pack's own file: built-in tokenizer
    _no_network_built(monkeypatch)
    monkeypatch.setattr(single_file, "carries_tiny_vocabulary", lambda *a: False)   # as a foreign file would be
    for check in (load_model, validate_model):
        with pytest.raises(ModelError) as err:
            check(str(written[1]))
        msg = str(err.value)
        assert written[1].name in msg and "do not match" in msg
        assert "49407" in msg and "585 rows" in msg
        assert str(ASSET_DIR / "tokenizer") in msg          # the tokenizer to use, by its full path
        assert "--model demo" in msg


def test_tokenizer_larger_than_text_encoder_is_refused_when_given_explicitly(written, tmp_path):
    big = _write_padded_tokenizer(tmp_path / "big", 600)
    with pytest.raises(ModelError, match="token ids up to 599.*585 rows"):
        load_model(str(written[1]), tokenizer=str(big))
    with pytest.raises(ModelError, match="token ids up to 599"):   # the diffusers folder path checks it too
        load_model(str(written[0]), tokenizer=str(big))


def test_small_tokenizer_on_clip_sized_text_encoder_names_the_clip_tokenizer(tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    from iddm_core.diffusion.tiny import _text_config

    bundle = build_tiny_bundle(0)
    bundle.text_encoder = CLIPTextModel(_text_config(49408)).eval()    # real CLIP vocabulary size, eos 49407
    path = save_single_file(bundle, tmp_path / "clip_sized.safetensors")
    _no_network_built(monkeypatch)
    tok = write_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ModelError) as err:
        load_model(str(path), tokenizer=str(tok))
    msg = str(err.value)
    assert "clip_sized.safetensors" in msg and "end-of-text id 584" in msg and "49407" in msg
    assert "standard CLIP tokenizer" in msg and "comfy/sd1_tokenizer" in msg and "--tokenizer" in msg


def test_check_tokenizer_fits_accepts_matching_and_extended_embeddings(tmp_path):
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer.from_pretrained(str(_write_padded_tokenizer(tmp_path / "clip", 49408)), local_files_only=True)
    check_tokenizer_fits(clip, 49408, 49407)
    check_tokenizer_fits(clip, 49410, 49407)     # added tokens (e.g. embeddings baked into the model)
    check_tokenizer_fits(clip, 49408, 2)         # legacy eos id 2 of old CLIP configs
    tiny = build_tiny_bundle(0).tokenizer
    check_tokenizer_fits(tiny, 585, 584)
    with pytest.raises(ModelError, match="ids up to 49407"):
        check_tokenizer_fits(clip, 585, 584)
    with pytest.raises(ModelError, match="end-of-text"):
        check_tokenizer_fits(tiny, 49408, 49407)


# ------------------------------------------------------------------------------- validate_model (issue 12)
def _nothing_loaded(monkeypatch):
    _no_network_built(monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("validate_model read the weights")

    monkeypatch.setattr(reading, "read_checkpoint", refuse)       # also what read_checkpoint_header falls back to
    monkeypatch.setattr(single_file, "read_checkpoint", refuse)


def test_validate_model_single_file_reads_only_the_header(written, monkeypatch):
    _nothing_loaded(monkeypatch)
    info = validate_model(str(written[1]), tokenizer=str(written[0] / "tokenizer"))
    assert info == ModelInfo("sd1", "epsilon", 64, "tiny", 585)
    assert validate_model(str(written[1])) == info    # the pack's own file: its tokenizer is built in
    monkeypatch.setattr(single_file, "carries_tiny_vocabulary", lambda *a: False)
    with pytest.raises(ModelError, match="vocab.json"):      # a foreign file, no tokenizer: as load_model says
        validate_model(str(written[1]))


@pytest.mark.parametrize("kind", ["sd2", "sd2v"])
def test_validate_model_detects_sd2_kinds(tmp_path, kind, monkeypatch):
    path = save_single_file(build_tiny_bundle(0, kind=kind), tmp_path / "m.safetensors")
    tok = write_tiny_tokenizer(tmp_path / "tok")
    _nothing_loaded(monkeypatch)
    info = validate_model(str(path), tokenizer=str(tok))
    assert (info.kind, info.prediction_type) == (kind, "v_prediction" if kind == "sd2v" else "epsilon")


def test_validate_model_finds_wrong_architecture_and_missing_weights(written, tmp_path, monkeypatch):
    state, _ = read_checkpoint(written[1])
    wrong = tmp_path / "tiny_without_meta.safetensors"
    save_file(state, str(wrong))                 # no iddm.configs metadata -> checked against the real SD1 shapes
    trimmed = tmp_path / "no_vae_conv.safetensors"
    save_file({k: v for k, v in state.items() if "first_stage_model.encoder.conv_in" not in k}, str(trimmed),
              metadata=read_checkpoint(written[1])[1])
    _nothing_loaded(monkeypatch)
    tok = str(written[0] / "tokenizer")
    with pytest.raises(ModelError, match="tiny_without_meta.safetensors.*sd1 architecture"):
        validate_model(str(wrong), tokenizer=tok)
    with pytest.raises(ModelError, match="no_vae_conv.safetensors.*VAE"):
        validate_model(str(trimmed), tokenizer=tok)
    with pytest.raises(ModelError, match="model not found"):
        validate_model(str(tmp_path / "nope.safetensors"))


def test_validate_model_diffusers_folder_pickle_demo_and_tiny(written, tmp_path, monkeypatch):
    import shutil

    state, _ = read_checkpoint(written[1])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    _no_network_built(monkeypatch)
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    assert validate_model(str(written[0])) == ModelInfo("sd1", "epsilon", 64, "tiny", 585)
    # a pickle carries no architecture metadata: checked against real SD1 shapes, which the tiny weights are not
    with pytest.raises(ModelError, match="model.ckpt: the UNet does not match the sd1 architecture"):
        validate_model(str(ckpt), tokenizer=str(written[0] / "tokenizer"))
    assert validate_model("demo") == ModelInfo("sd1", "v_prediction", 128, "demo", 585)
    assert validate_model("tiny").resolution == 64
    broken = tmp_path / "broken"
    shutil.copytree(written[0], broken)
    for f in (broken / "unet").glob("diffusion_pytorch_model.*"):
        f.unlink()
    with pytest.raises(ModelError, match="unet/ holds no weights"):
        validate_model(str(broken))
