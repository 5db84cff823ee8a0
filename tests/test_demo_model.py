"""The shipped demo model: what it is (SD1-shaped, small, fp16), what it does (reconstructs the held-out demo
photos, its one-step predictions are faces that Stage II can push away), and how it is rebuilt."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def demo():
    from iddm_core.diffusion.loading import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def demo_crops():
    from iddm_core.demo.model.measure import demo_crops

    return demo_crops(128)


def test_shipped_weights_are_small_fp16_sd1_and_load_by_name(demo):
    from safetensors import safe_open

    from iddm_core.diffusion.builtin import ASSET_DIR, weights_path

    total = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert total <= 16 * 2 ** 20, f"shipped demo model is {total / 2 ** 20:.1f} MiB"
    with safe_open(str(weights_path()), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k not in ("v_pred", "ztsnr")}
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
        assert {"v_pred", "ztsnr"} <= set(f.keys())           # ComfyUI's markers: v-prediction, zero terminal SNR
    assert dtypes == {"F16"}
    assert (demo.kind, demo.resolution, demo.vae_scale_factor, demo.title) == ("sd1", 128, 4, "demo")
    assert demo.prediction_type == "v_prediction"                       # on a zero-terminal-SNR schedule:
    assert float(demo.noise_scheduler.alphas_cumprod[-1]) < 1e-6        # t = 999 keeps nothing of the latent
    assert demo.dtype == torch.float32                     # loaded for training in fp32
    assert any("attn2" in n for n, _ in demo.unet.named_modules())   # cross-attention UNet, like SD


def test_demo_identity_is_held_out_of_training_data():
    from iddm_core.demo.model import data

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
    from iddm_core.demo.model.measure import native_distance, uint8_images, vae_round_trip
    from iddm_core.evaluation.metrics import psnr

    images, _ = demo_crops
    recon = vae_round_trip(demo, images)
    assert float(psnr(recon, images).min()) >= 29.0
    for a, b in zip(uint8_images(images), uint8_images(recon)):
        d = native_distance(a, b)
        assert d is not None and d <= 0.37


def test_unet_denoises_a_face_it_never_saw(demo, demo_crops):
    """The held-out person's photos, noised to small timesteps, are denoised (Stage I's L_rec, the MSE of the
    model's target v, well below about 1, the score of predicting zero), not pulled towards the training faces: a
    UNet trained on the faces alone scored 1.31 at t = 50 and 1.00 at t = 100 here (epsilon MSE; at these
    timesteps v is nearly epsilon), and DreamBooth on it diverged."""
    from iddm_core.demo.model.measure import denoising_error

    images, _ = demo_crops
    errors = {t: denoising_error(demo, images, t, seed=0, prompt="a photo of sks person") for t in (50, 100)}
    print("L_rec (v MSE) on the held-out photos:", errors)
    assert all(e < 0.5 for e in errors.values())


def test_samples_from_pure_noise_are_faces(demo):
    """Issue 10: dlib finds a face in most samples. 4 samples of the class prompt (DDIM 25 steps, guidance 5),
    judged by the detector ``evaluate`` uses for samples this small (dlib's CNN)."""
    from iddm_core.evaluation.faces import sample_detector_name, scan_faces
    from iddm_core.face.detect import get_detector
    from iddm_core.training.sampling import generate_images

    assert sample_detector_name(demo.resolution) == "dlib-cnn"
    with torch.no_grad():
        images = generate_images(demo, "a photo of person", 4, seed=0, steps=25, guidance_scale=5.0)
    found = scan_faces(images, get_detector("dlib-cnn")).found
    print("faces found in samples:", found)
    assert sum(found) >= 3


def test_full_dreambooth_fits_the_photos_and_freezes_the_unet_after(demo_crops):
    """measure's full-UNet DreamBooth (item 5) lowers the denoising error of the photos it trains on."""
    from iddm_core.diffusion.loading import load_demo_bundle
    from iddm_core.demo.model.measure import denoising_error, full_dreambooth

    bundle = load_demo_bundle()
    images, _ = demo_crops
    before = denoising_error(bundle, images, 200, seed=0, prompt="a photo of sks person")
    full_dreambooth(bundle, images, 30, lr=1e-4)
    after = denoising_error(bundle, images, 200, seed=0, prompt="a photo of sks person")
    print(f"L_rec at t = 200 on the trained photos: {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before
    assert not bundle.unet.training and not any(p.requires_grad for p in bundle.unet.parameters())


def test_min_snr_weights_of_the_epsilon_and_v_losses():
    from iddm_core.demo.model.architecture import build_scheduler
    from iddm_core.demo.model.train import snr_weights

    ac = build_scheduler(v_zero_snr=True).alphas_cumprod
    t = torch.tensor([0, 500, 998])
    snr = ac[t] / (1 - ac[t])
    eps_w, v_w = snr_weights(ac, t, 5.0), snr_weights(ac, t, 5.0, v_prediction=True)
    assert torch.allclose(v_w, eps_w * snr / (snr + 1))
    assert eps_w[0] < 0.01 and eps_w[-1] == 1.0                 # high SNR clamped, low SNR kept
    assert float(snr_weights(ac, torch.tensor([999]), 5.0, v_prediction=True)) == 0.0   # zero terminal SNR


def test_stage_two_through_the_diffusion_model_lowers_similarity(demo, demo_crops):
    """Stage II on the real path: VAE encoder -> noised latent -> UNet -> one-step clean latent -> VAE decoder ->
    dlib. The similarity of x0_hat (same noise before/after) and of X' itself must both fall."""
    from iddm_core.face.ensemble import FaceEnsembleLoss
    from iddm_core.face.registry import load_recognizer, parse_surrogates
    from iddm_core.training.conditioning import encode_prompts
    from iddm_core.protection.pgd import Noise, PGDConfig, pgd_two_stage, predict_clean_image

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
    from iddm_core.diffusion.loading import load_demo_bundle
    from iddm_core.demo.model.architecture import assemble, build_text_encoder, build_unet
    from iddm_core.demo.model.data import PatchSampler
    from iddm_core.demo.model.train import VAETrainConfig, export, train_vae, vae_loss

    torch.manual_seed(0)
    sampler = PatchSampler(16, seed=0, face_crops=2)
    probe = sampler(8)
    from iddm_core.demo.model.architecture import build_vae

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
    from iddm_core.demo.model.data import face_pool
    from iddm_core.face.detect import get_detector

    images, words = face_pool(6, 128, seed=3)
    det = get_detector("dlib")
    assert set(words) == {"man", "woman"}
    assert sum(bool(det.detect(np.ascontiguousarray(im))) for im in images) >= 5


def test_demo_story_compares_no_defense_and_iddm(tmp_path):
    """`python -m iddm_core demo` end to end: two valid kohya LoRAs, X' less similar than X0 within the budget,
    both sample sets scored, and a contact sheet of four rows."""
    from PIL import Image

    from iddm_core.demo.story import DEMO_SAMPLES, format_result, run_demo
    from iddm_core.training.kohya_check import check_kohya, read_kohya_lora

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
