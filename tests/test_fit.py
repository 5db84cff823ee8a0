"""Pre-flight memory checks (fit.py): weights vs free memory before loading, and trial steps whose out-of-memory
becomes advice, on the CPU too (an address-space cap turns the kernel's OOM kill into an exception)."""
from __future__ import annotations

import resource
import sys

import pytest
import torch

from iddm_core.diffusion import fit
from iddm_core.diffusion.runtime import Runtime
from iddm_core.errors import InputError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux-only")
CPU_FP32 = Runtime.decide("cpu")         # fp32, no checkpointing: the advice offers both


@linux
def test_available_bytes_reads_the_system():
    have = fit.available_bytes("cpu")
    assert have is not None and 0 < have < 1 << 50
    assert fit.available_bytes("meta") is None


@linux
def test_cpu_cap_turns_an_allocation_past_the_headroom_into_an_exception_and_is_undone():
    """1 GiB is refused under a 256 MiB headroom (an exception, as an OOM kill would not be), allowed after."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(RuntimeError) as err:
        with fit.cpu_memory_cap(headroom_bytes=256 * 2 ** 20):
            torch.empty(fit.GIB, dtype=torch.uint8)
    assert fit.is_out_of_memory(err.value)
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert torch.empty(fit.GIB, dtype=torch.uint8).numel() == fit.GIB        # the cap is gone
    with fit.cpu_memory_cap(headroom_bytes=256 * 2 ** 20):                    # small work is untouched by it
        assert float(torch.ones(1000, 1000).sum()) == 1e6


@linux
def test_check_fits_on_cpu_reports_a_trial_that_cannot_fit_with_advice(monkeypatch):
    """On the CPU the trials run under the cap: a trial needing 1 GiB with 256 MiB available becomes advice."""
    monkeypatch.setattr(fit, "available_bytes", lambda device: 256 * 2 ** 20)
    calls = []

    def trial_finetune():
        calls.append("finetune")

    def trial_pgd():
        torch.empty(fit.GIB, dtype=torch.uint8)

    with pytest.raises(InputError, match="Stage II PGD step ran out of memory") as err:
        fit.check_fits(trial_finetune, trial_pgd, CPU_FP32, 2, "full", 512)
    text = str(err.value)
    assert calls == ["finetune"] and "pgd_batch 1" in text and "0.2 GiB of RAM" in text
    assert "Nothing was trained" in text and "gradient full" in text


@linux
def test_check_fits_names_the_attack_it_tried(monkeypatch):
    """protect's trial is an ascent step with no gradient modes: the message says so and offers no gradient tip."""
    monkeypatch.setattr(fit, "available_bytes", lambda device: 256 * 2 ** 20)
    with pytest.raises(InputError, match="a PGD ascent step ran out of memory") as err:
        fit.check_fits(lambda: None, lambda: torch.empty(fit.GIB, dtype=torch.uint8),
                       Runtime.decide("cpu", "no", "yes"), 1, None, 512, pgd_step="a PGD ascent step")
    text = str(err.value)
    assert "gradient" not in text.replace("gradient checkpointing", "") and "pgd_batch 1," in text


def test_check_fits_lets_other_errors_through_unchanged():
    def broken():
        raise RuntimeError("shape mismatch in the UNet")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        fit.check_fits(broken, lambda: None, CPU_FP32, 2, "full", 64)


def test_weight_bytes_follow_the_storage_dtypes():
    counts = {"unet": 1000, "vae": 10, "text_encoder": 100}
    assert fit.weight_bytes(counts, {}) == 4 * 1110
    assert fit.weight_bytes(counts, {"unet": torch.bfloat16, "text_encoder": torch.float16}) == 2 * 1100 + 4 * 10


@linux
def test_weights_that_cannot_fit_are_refused_before_loading_and_half_storage_halves_the_need(monkeypatch):
    from iddm_core.diffusion.precision import Precision, weight_dtypes

    monkeypatch.setattr(fit, "available_bytes", lambda device: 8 * fit.GIB)
    sdxl = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_841}
    with pytest.raises(InputError, match=r"weights alone take 12\.9 GiB, 8\.0 GiB of RAM") as err:
        fit.check_weights_fit(sdxl, {}, "cpu", "the model 'x' (sdxl)")
    assert "Nothing was loaded" in str(err.value) and "'x' (sdxl)" in str(err.value)
    half = weight_dtypes(Precision("cuda", torch.bfloat16))
    assert set(half) == {"unet", "text_encoder", "text_encoder_2"}       # the VAE stays fp32
    assert fit.weight_bytes(sdxl, half) / fit.GIB == pytest.approx(6.62, abs=0.01)
    fit.check_weights_fit(sdxl, half, "cpu", "x")                        # 6.6 GiB of 8: passes


def test_model_check_counts_the_bytes_the_runtime_stores(monkeypatch):
    """check_model_fits uses the runtime's weight dtypes, as the loader does: an SDXL's weights fit 8 GiB of a bf16
    GPU (half storage), not of the same GPU with mixed precision off. No GPU needed: the runtime is decided from a
    given compute capability."""
    from types import SimpleNamespace

    from iddm_core.diffusion.runtime import decide_runtime

    monkeypatch.setattr(fit, "available_bytes", lambda device: 8 * fit.GIB)
    sdxl = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_841}
    info = SimpleNamespace(parameters=sdxl, title="x", kind="sdxl")
    fit.check_model_fits(info, decide_runtime("cuda", (9, 0)))
    with pytest.raises(InputError, match=r"12\.9 GiB, 8\.0 GiB of GPU is available"):
        fit.check_model_fits(info, decide_runtime("cuda", (9, 0), "no"))


def test_validate_model_counts_parameters_without_loading(tmp_path):
    """Counted on the meta device for a diffusers folder, a single file and "tiny"; equal to the loaded model's."""
    from iddm_core.diffusion.loading import load_model
    from iddm_core.diffusion.validation import validate_model
    from iddm_core.diffusion.tiny import write_tiny_model

    folder, single = write_tiny_model(tmp_path, kind="sdxl")
    bundle = load_model(str(folder))
    real = {name: sum(p.numel() for p in getattr(bundle, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert dict(validate_model(str(folder)).parameters) == real
    assert dict(validate_model(str(single), tokenizer=str(folder / "tokenizer")).parameters) == real
    assert dict(validate_model("tiny", kind="sdxl").parameters) == real
