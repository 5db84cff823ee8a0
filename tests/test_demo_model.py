"""The shipped demo model: what it is (SD1-shaped, small, fp16), what it does (reconstructs the held-out demo
photos, its one-step predictions are faces that Stage II can push away), and how it is rebuilt."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def demo():
    from iddm_core.models import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def demo_crops():
    from iddm_core.demo_model.measure import demo_crops

    return demo_crops(128)


def test_shipped_weights_are_small_fp16_sd1_and_load_by_name(demo):
    from safetensors import safe_open

    from iddm_core.demo_model import ASSET_DIR, weights_path

    total = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert total <= 16 * 2 ** 20, f"shipped demo model is {total / 2 ** 20:.1f} MiB"
    with safe_open(str(weights_path()), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
    assert dtypes == {"F16"}
    assert (demo.kind, demo.resolution, demo.vae_scale_factor, demo.title) == ("sd1", 128, 4, "demo")
    assert demo.dtype == torch.float32                     # loaded for training in fp32
    assert any("attn2" in n for n, _ in demo.unet.named_modules())   # cross-attention UNet, like SD


def test_demo_identity_is_held_out_of_training_data():
    from iddm_core.demo_model import data

    names = [name for name, *_ in data.SOURCES]
    assert not set(names) & set(data.HELD_OUT) and not set(data.FACES) & set(data.HELD_OUT)
    with pytest.raises(ValueError, match="held out"):
        data.load_source(data.HELD_OUT[0])
    for _, _, source, licence in data.SOURCES:
        assert source and licence


def test_vae_round_trip_keeps_the_held_out_face(demo, demo_crops):
    """Measured on the shipped model: PSNR 30.3 / 31.2 dB, dlib distance 0.23 / 0.34 (the 4-latent-channel model
    before it: 25.4 / 26.5 dB, 0.39 / 0.41). Guards against a regression; issue 10's PSNR target (>= 26 dB) is
    met, its dlib target (<= 0.2) is NOT."""
    from iddm_core.demo_model.measure import native_distance, uint8_images, vae_round_trip
    from iddm_core.evaluate import psnr

    images, _ = demo_crops
    recon = vae_round_trip(demo, images)
    assert float(psnr(recon, images).min()) >= 29.0
    for a, b in zip(uint8_images(images), uint8_images(recon)):
        d = native_distance(a, b)
        assert d is not None and d <= 0.37


def test_unet_denoises_a_face_it_never_saw(demo, demo_crops):
    """The held-out person's photos, noised to small timesteps, are denoised (epsilon MSE well below 1, the score
    of predicting zero), not pulled towards the training faces: a UNet trained on the faces alone scored 1.31 at
    t = 50 and 1.00 at t = 100 here, and DreamBooth on it diverged."""
    from iddm_core.demo_model.measure import denoising_error

    images, _ = demo_crops
    errors = {t: denoising_error(demo, images, t, seed=0, prompt="a photo of sks person") for t in (50, 100)}
    print("epsilon MSE on the held-out photos:", errors)
    assert all(e < 0.5 for e in errors.values())


def test_stage_two_through_the_diffusion_model_lowers_similarity(demo, demo_crops):
    """Stage II on the real path: VAE encoder -> noised latent -> UNet -> one-step clean latent -> VAE decoder ->
    dlib. The similarity of x0_hat (same noise before/after) and of X' itself must both fall."""
    from iddm_core.face.ensemble import FaceEnsembleLoss
    from iddm_core.face.registry import load_recognizer, parse_surrogates
    from iddm_core.finetune import encode_prompts
    from iddm_core.pgd import Noise, PGDConfig, pgd_two_stage, predict_clean_image

    images, landmarks = demo_crops
    ref, x0, lm0 = images[:1], images[1:], landmarks[1:]
    ensemble = FaceEnsembleLoss([load_recognizer(parse_surrogates("dlib")[0])], tau=0.03)
    ensemble.set_references(ref, landmarks[:1])
    with torch.no_grad():
        embeds = encode_prompts(demo, ["a photo of sks person"])
    cfg = PGDConfig(T=8, rho=0.01, id_t_max=0.1)     # timesteps where the model's x0_hat are faces (measured)
    x = pgd_two_stage(demo, ensemble, x0, lm0, embeds, cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    shape = (1, demo.unet.config.in_channels, 32, 32)
    noise = Noise(posterior=torch.randn(shape, generator=gen), t=torch.tensor([50]), eps=torch.randn(shape, generator=gen))
    with torch.no_grad():
        sim = lambda im: float(ensemble(im, lm0)[1]["dlib"].mean())  # noqa: E731
        hat_before = sim(predict_clean_image(demo, x0, embeds, noise).clamp(0, 1))
        hat_after = sim(predict_clean_image(demo, x, embeds, noise).clamp(0, 1))
        before, after = sim(x0), sim(x)
    print(f"dlib similarity: X0 {before:.3f} -> X' {after:.3f}; x0_hat {hat_before:.3f} -> {hat_after:.3f}")
    assert after < before - 0.02
    assert hat_after < hat_before - 0.02
    assert (x - x0).abs().max() <= cfg.eta + 1e-6


def test_training_stages_reduce_their_loss_and_export_loads(tmp_path):
    """A few steps of each stage on the real data pipeline (not the shipped quality): losses fall, and the
    exported fp16 file loads back as the same SD1 bundle."""
    from iddm_core.demo_model import load_demo_bundle
    from iddm_core.demo_model.architecture import assemble, build_text_encoder, build_unet
    from iddm_core.demo_model.data import PatchSampler
    from iddm_core.demo_model.train import VAETrainConfig, export, train_vae, vae_loss

    torch.manual_seed(0)
    sampler = PatchSampler(16, seed=0, face_crops=2)
    probe = sampler(8)
    from iddm_core.demo_model.architecture import build_vae

    with torch.no_grad():
        before = float(vae_loss(build_vae(0), probe, 0.0, torch.Generator().manual_seed(0))[1])
    vae = train_vae(VAETrainConfig(steps=30, batch=8, patch=16, lr=2e-3, warmup=5), sampler)
    with torch.no_grad():
        after = float(vae_loss(vae, probe, 0.0, torch.Generator().manual_seed(0))[1])
    assert after < 0.8 * before

    text_encoder, tokenizer = build_text_encoder(0)
    bundle = assemble(build_unet(0), vae, text_encoder, tokenizer)
    path = export(bundle, tmp_path / "model")
    loaded = load_demo_bundle(tmp_path / "model")
    assert path.is_file() and loaded.kind == "sd1" and loaded.resolution == 128
    w = dict(bundle.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(dict(loaded.unet.named_parameters())["conv_in.weight"], w.half().float())


def test_augmented_face_crops_keep_a_detectable_face():
    from iddm_core.demo_model.data import face_pool
    from iddm_core.face.detect import get_detector

    images, words = face_pool(6, 128, seed=3)
    det = get_detector("dlib")
    assert set(words) == {"man", "woman"}
    assert sum(bool(det.detect(np.ascontiguousarray(im))) for im in images) >= 5


def test_demo_story_compares_no_defense_and_iddm(tmp_path):
    """`python -m iddm_core demo` end to end: two valid kohya LoRAs, X' less similar than X0 within the budget,
    both sample sets scored, and a contact sheet of four rows."""
    from PIL import Image

    from iddm_core.demo import DEMO_SAMPLES, format_result, run_demo
    from iddm_core.lora import check_kohya, read_kohya_lora

    r = run_demo(tmp_path)
    for name in ("iddm_lora.safetensors", "no_defense_lora.safetensors"):
        assert check_kohya(*read_kohya_lora(tmp_path / name)) == []
    assert [(j.name, j.role) for j in r.judges] == [("dlib", "surrogate"), ("faceres", "held out")]
    dlib = r.judges[0]
    assert dlib.similarity_after < dlib.similarity_before - 0.05
    assert 20.0 < r.psnr < 60.0                         # eta = 0.08 bounds how far X' is from X0
    for j in r.judges:
        assert set(j.rows) == set(j.denoise_rows) == {"no-defense LoRA", "IDDM LoRA"}
        for scores in j.rows.values():
            assert scores.n == DEMO_SAMPLES and 0.0 <= scores.fsr <= 1.0
    with Image.open(r.sheet) as im:
        assert im.size[1] == 4 * 128 + 5 * 4               # X0, X', no-defense samples, IDDM samples
    text = format_result(r)
    assert "no-defense LoRA" in text and "IDDM LoRA" in text and "PSNR" in text and "faceres (held out)" in text
