"""The pack's own models inside a host (issue 24 item 3): the tiny single files train with no tokenizer argument,
also in a ComfyUI whose own CLIP tokenizer (49,408 tokens) is found first; the demo model, which ComfyUI's Load
Checkpoint cannot load, gives portraits with a trained LoRA through the IDDM Portraits node."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comfy_harness import ComfyStubs, InterruptProcessingException, load_pack, unload_pack

PACK = "comfyui-iddm-portraits"
CLIP_VOCAB = 49408


def write_full_size_clip_tokenizer(folder: Path) -> Path:
    """A tokenizer folder with the real CLIP vocabulary's size and special tokens (the words are made up): what
    ComfyUI's comfy/sd1_tokenizer looks like to the loader."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}</w>": i for i in range(CLIP_VOCAB - 2)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = CLIP_VOCAB - 2, CLIP_VOCAB - 1
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def _out(returned):
    return returned["result"] if isinstance(returned, dict) else returned


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, small_faces_dir):
    from iddm_core.diffusion.tiny import write_tiny_model

    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui_real_tokenizer"))
    scratch = stubs.root / "scratch"
    for kind in ("sd1", "sdxl"):
        _, single = write_tiny_model(scratch, kind=kind)
        shutil.move(str(single), stubs.models / "checkpoints" / single.name)
    write_full_size_clip_tokenizer(stubs.comfy_dir / "sd1_tokenizer")
    photos = stubs.input / "photos"
    photos.mkdir(parents=True)
    for name in ("obama.jpg", "obama2.jpg"):
        shutil.copy(small_faces_dir / name, photos / name)
        shutil.copy(small_faces_dir / name, photos / f"m_{name}")
    stubs.install()
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    unload_pack(PACK)


def test_tiny_single_files_need_no_tokenizer_even_where_comfyui_has_its_own(comfy):
    """Before the fix ComfyUI's 49,408-token tokenizer was taken for the tiny file and refused ("tokenizer and text
    encoder do not match ... pass --tokenizer"), advice a ComfyUI user cannot follow."""
    from iddm_core.diffusion.loading import load_model
    from iddm_core.diffusion.tokenizers import resolve_tokenizer
    from iddm_core.diffusion.tiny import tiny_vocab_and_merges

    stubs, _ = comfy
    assert len(resolve_tokenizer("sd1")) == CLIP_VOCAB          # ComfyUI's own tokenizer is what would be found
    for name in ("tiny.safetensors", "tiny-sdxl.safetensors"):
        bundle = load_model(str(stubs.models / "checkpoints" / name))
        assert len(bundle.tokenizer) == len(tiny_vocab_and_merges()[0])
        if bundle.tokenizer_2 is not None:
            assert bundle.tokenizer_2.pad_token == "!"
    # a tokenizer the user names is still used, and still checked against the text encoder
    with pytest.raises(Exception, match="do not match"):
        load_model(str(stubs.models / "checkpoints" / "tiny.safetensors"), tokenizer=str(stubs.comfy_dir / "sd1_tokenizer"))


@pytest.mark.parametrize("ckpt", ["tiny.safetensors", "tiny-sdxl.safetensors"])
def test_train_node_trains_the_tiny_single_files_inside_comfyui(comfy, ckpt):
    stubs, pack = comfy
    nodes = pack.NODE_CLASS_MAPPINGS
    handle = _out(nodes["IDDMLoadPrivateRefs"]().load("photos", 64, 0, 0))[0]
    loss = _out(nodes["IDDMFaceEnsembleLoss"]().build(0.03, use_dlib=True))[0]
    pgd = _out(nodes["IDDMPGDTwoStage"]().build("fidelity", 2, 0.5, 0.08, 0.008))[0]
    name = f"from_{ckpt.split('.')[0]}"
    out = nodes["IDDMTrainLoRA"]().train(ckpt, handle, loss, pgd, 1, 1, 2, 1e-4, 64, 0, name, True,
                                         prior_preservation=False, resume=False)
    assert _out(out)[0] == f"{name}.safetensors"
    assert (stubs.models / "loras" / f"{name}.safetensors").is_file()


def test_portraits_node_samples_the_demo_model_with_a_lora(comfy):
    """The demo model (which Load Checkpoint cannot load) gives portraits; the LoRA changes them; the same seed
    gives the same portraits as the library's sampler; nothing is written."""
    from iddm_core.training.sampling import generate_images
    from iddm_core.training.kohya import save_kohya_lora
    from iddm_core.training.lora import LoraSpec, add_lora, lora_parameters
    from iddm_core.diffusion.loading import load_model

    stubs, pack = comfy
    nodes = pack.NODE_CLASS_MAPPINGS
    choices = nodes["IDDMPortraits"].INPUT_TYPES()["required"]
    demo_choice = choices["ckpt_name"][0][-1]
    assert "demo" in demo_choice.lower()
    # a LoRA for the demo model with visible weights (a trained one would take minutes on the CPU)
    bundle = load_model("demo")
    add_lora(bundle, LoraSpec(rank=2), seed=0)
    with torch.no_grad():
        for p in lora_parameters(bundle):
            p.add_(torch.randn_like(p) * 0.2)
    save_kohya_lora(stubs.models / "loras" / "demo_me.safetensors", bundle, LoraSpec(rank=2), "demo_me",
                    overwrite=True)
    assert "demo_me.safetensors" in nodes["IDDMPortraits"].INPUT_TYPES()["required"]["lora_name"][0]
    before = sorted(p.name for p in stubs.output.rglob("*")) + sorted(p.name for p in stubs.temp.rglob("*"))
    node = nodes["IDDMPortraits"]()
    stubs.progress.clear()
    (with_lora,) = node.sample(demo_choice, "demo_me.safetensors", "a photo of sks person", 2, 3, 3, 5.0,
                               unique_id="9")
    (base,) = node.sample(demo_choice, choices["lora_name"][0][0], "a photo of sks person", 2, 3, 3, 5.0)
    assert tuple(with_lora.shape) == (2, 128, 128, 3) and with_lora.min() >= 0 and with_lora.max() <= 1
    assert (with_lora - base).abs().mean() > 1e-3                       # the LoRA is applied
    reference = generate_images(load_model("demo"), "a photo of sks person", 2, seed=3, steps=3, guidance_scale=5.0)
    assert torch.allclose(base, reference.permute(0, 2, 3, 1), atol=1e-5)   # the library's sampler, same seed
    assert stubs.progress, "no progress reported"
    after = sorted(p.name for p in stubs.output.rglob("*")) + sorted(p.name for p in stubs.temp.rglob("*"))
    assert after == before


def test_portraits_node_checks_numbers_and_names_before_loading(comfy):
    from iddm_core.errors import InputError

    _, pack = comfy
    node = pack.NODE_CLASS_MAPPINGS["IDDMPortraits"]()
    with pytest.raises(Exception, match="lora_name"):
        node.sample("tiny.safetensors", "missing.safetensors", "x", 1, 0, 2, 5.0)
    with pytest.raises(Exception, match="steps=0"):
        node.sample("tiny.safetensors", "missing.safetensors", "x", 1, 0, 0, 5.0)
    assert issubclass(InputError, Exception)


def test_portraits_node_cancels_between_images(comfy):
    """Cancel during the first batch of 4: the node stops after it (progress shows 4 of 8) and returns nothing."""
    stubs, pack = comfy
    cls = pack.NODE_CLASS_MAPPINGS["IDDMPortraits"]
    stubs.progress.clear()
    stubs.interrupt_after = 1                  # Cancel once the first batch is on the progress bar
    try:
        with pytest.raises(InterruptProcessingException):
            cls().sample("tiny.safetensors", cls.INPUT_TYPES()["required"]["lora_name"][0][0], "x", 8, 0, 2, 5.0)
    finally:
        stubs.interrupted, stubs.interrupt_after = False, None
    assert [value for _, value, _ in stubs.progress] == [4]


def test_cli_trains_the_tiny_single_file_with_no_tokenizer(tmp_path, small_faces_dir, monkeypatch):
    from iddm_core.cli import main

    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    out = tmp_path / "me.safetensors"
    assert main(["train", "--refs", str(small_faces_dir), "--out", str(out), "--model",
                 str(tmp_path / "m" / "tiny.safetensors"), "--K", "1", "--T", "2", "--ft-steps", "1", "--no-prior",
                 "--resolution", "64"]) == 0
    assert out.is_file()
