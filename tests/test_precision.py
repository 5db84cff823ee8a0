"""Precision policy per device, fp16 loss scaling, and the out-of-memory check before a run."""
import pytest
import torch

from iddm_core.errors import InputError
from iddm_core.diffusion.precision import LossScale, Precision, choose_precision


@pytest.mark.parametrize("capability,name,scaled,vae_fp32", [
    ((6, 1), "fp16", True, True),     # Pascal (GTX 10xx): bf16 only emulated
    ((7, 5), "fp16", True, True),     # Turing (RTX 20xx, T4): is_bf16_supported() may say True; it is emulated
    ((8, 0), "bf16", False, False),   # A100
    ((8, 9), "bf16", False, False),   # Ada (RTX 40xx)
    ((9, 0), "bf16", False, False),   # H100
])
def test_auto_policy_by_compute_capability(capability, name, scaled, vae_fp32):
    p = choose_precision("cuda", capability)
    assert (p.name, p.scales_loss, p.vae_fp32) == (name, scaled, vae_fp32)


def test_cpu_is_fp32_unless_asked():
    p = choose_precision("cpu", None)
    assert p.name == "fp32" and p.dtype is None and not p.scales_loss
    assert choose_precision("cpu", None, "bf16").dtype == torch.bfloat16      # honoured: CPU autocast has bf16
    assert choose_precision("cuda", (9, 0), "no").name == "fp32"
    assert choose_precision("cuda", (9, 0), "fp16").name == "fp16"            # an explicit fp16 is honoured


def test_bf16_refused_where_emulated_and_bad_words_named():
    with pytest.raises(InputError, match=r"bf16.*7\.5"):
        choose_precision("cuda", (7, 5), "bf16")
    with pytest.raises(InputError, match="mixed_precision"):
        choose_precision("cuda", (8, 0), "fp8")


HALF_PARTS = {"unet", "text_encoder", "text_encoder_2"}      # the VAE is never stored in half precision


@pytest.mark.parametrize("device,capability,mixed,ckpt,name,checkpointing,stored", [
    ("cuda", (8, 6), "auto", "auto", "bf16", True, torch.bfloat16),     # Ampere: bf16, checkpointing on for CUDA
    ("cuda", (7, 5), "auto", "auto", "fp16", True, torch.float16),      # Turing: fp16 (bf16 only emulated)
    ("cuda:1", (9, 0), "no", "no", "fp32", False, None),                # everything switched off
    ("cpu", None, "auto", "auto", "fp32", False, None),                 # CPU: fp32, no checkpointing (30% slower)
    ("cpu", None, "bf16", "yes", "bf16", True, torch.bfloat16),         # asked for: honoured on the CPU too
])
def test_runtime_is_decided_from_device_capability_and_settings(device, capability, mixed, ckpt, name,
                                                                checkpointing, stored):
    from iddm_core.diffusion.runtime import decide_runtime

    rt = decide_runtime(device, capability, mixed, ckpt)
    assert rt.device == torch.device(device) and rt.precision.name == name and rt.checkpointing is checkpointing
    assert rt.weight_dtypes == ({} if stored is None else {part: stored for part in HALF_PARTS})
    assert rt.describe() == {"precision": name, "gradient_checkpointing": checkpointing}     # the reports' keys


def test_runtime_refuses_bad_settings_naming_them():
    from iddm_core.diffusion.runtime import decide_runtime

    with pytest.raises(InputError, match="gradient_checkpointing='maybe'"):
        decide_runtime("cpu", None, "auto", "maybe")
    with pytest.raises(InputError, match=r"bf16.*7\.5"):
        decide_runtime("cuda", (7, 5), "bf16", "auto")


def test_runtime_decide_reads_the_device_and_takes_a_configs_settings():
    from iddm_core.diffusion.runtime import Runtime, decide_runtime
    from iddm_core.protection.iddm import IDDMConfig

    assert Runtime.decide("cpu") == decide_runtime("cpu", None)
    cfg = IDDMConfig(mixed_precision="bf16", gradient_checkpointing="yes")
    assert Runtime.for_settings(cfg, "cpu") == decide_runtime("cpu", None, "bf16", "yes")


def test_loss_scale_backs_off_and_grows():
    s = LossScale(True, init=1024.0, growth_interval=2)
    s.update(False)
    assert s.value == 512.0
    s.update(True)
    assert s.value == 512.0
    s.update(True)
    assert s.value == 1024.0
    off = LossScale(False)
    off.update(False)
    assert off.value == 1.0


def test_fp16_loss_scaling_rescues_an_underflowing_gradient():
    """d/dx of 1e-4 * sum(1e-4 * x) is 1e-8 per pixel: below fp16's smallest subnormal (6e-8), so unscaled the
    fp16 backward gives sign(0) = 0 and the PGD step would do nothing. Scaled by 2^12 it survives; scaled by 2^16
    the fp16 gradient of the loss itself overflows (65536 > 65504), which is reported as not finite (PGD then
    redoes the step in fp32 and the scale halves)."""
    from iddm_core.protection.pgd import _gradient

    policy = Precision("cpu", torch.float16, vae_fp32=True)
    x = torch.rand(1, 3, 8, 8)

    def compute(xb):
        y = (xb.half() * 1e-4).sum() * 1e-4
        return y, y.detach(), {}

    grad_plain, _, _ = _gradient(compute, x, policy, LossScale(False))
    grad_scaled, _, _ = _gradient(compute, x, policy, LossScale(True, init=2.0 ** 12))
    assert int(torch.sign(grad_plain).abs().sum()) == 0
    assert bool((torch.sign(grad_scaled) == 1).all())
    grad_overflow, _, _ = _gradient(compute, x, policy, LossScale(True, init=2.0 ** 16))
    assert grad_overflow is None


def test_out_of_memory_becomes_advice_before_any_training(tmp_path, monkeypatch):
    """A trial Stage II step that runs out of memory stops the run before the first fine-tune step, with advice,
    and writes nothing."""
    import iddm_core.protection.iddm as iddm_mod
    from iddm_core.demo.story import demo_photos
    from iddm_core.face.detect import get_detector
    from iddm_core.protection.iddm import IDDMConfig, run_iddm
    from iddm_core.diffusion.loading import load_model
    from iddm_core.protection.pgd import PGDConfig
    from iddm_core.protection.refs import refs_from_photos

    refs = refs_from_photos(demo_photos(), 64, get_detector("dlib"), seed=0)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(iddm_mod, "pgd_two_stage", oom)
    events = []
    cfg = IDDMConfig(K=1, pgd=PGDConfig(T=2, batch=2), ft_steps=1, resolution=64, num_class_images=1)
    out = tmp_path / "me.safetensors"
    with pytest.raises(InputError, match="Stage II PGD step ran out of memory") as err:
        run_iddm(load_model("tiny"), refs, cfg, out_path=out, callback=events.append, check_memory=True)
    assert "pgd_batch 1" in str(err.value) and "checkpointing" in str(err.value)
    assert not out.exists() and not [e for e in events if e.phase == "finetune"]
