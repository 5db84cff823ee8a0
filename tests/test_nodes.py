"""The ComfyUI node pack, loaded and run the way ComfyUI does, against stub ComfyUI modules (tests/comfy_harness)."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_harness import REPO, ComfyStubs, InterruptProcessingException, linked_type_ok, load_pack, node_problems, \
    run_workflow

PACK = "comfyui-iddm"
PRIVATE = "secret_alice"          # a private-looking photo name that must never appear in any output
API_WORKFLOW = REPO / "example_workflows" / "iddm_train_and_sample_api.json"
UI_WORKFLOW = REPO / "example_workflows" / "iddm_train_and_sample.json"
HEAVY = ("diffusers", "transformers", "dlib", "_dlib_pybind11", "kornia")


def _write_photos(folder: Path, source: Path) -> None:
    """Two public-domain photos of one person plus their mirror images, under private-looking names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("obama.jpg", "obama2.jpg")):
        im = Image.open(source / name).convert("RGB")
        im.save(folder / f"{PRIVATE}_{i}.jpg")
        im.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{PRIVATE}_{i}_m.jpg")


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_faces_dir):
    """Stub ComfyUI with the tiny model as a single-file checkpoint (+ ComfyUI's tokenizer folder) and as a
    diffusers folder, and four photos in input/iddm_photos; the pack loaded as ComfyUI loads it."""
    from iddm_core.tiny import write_tiny_model, write_tiny_tokenizer

    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui"))
    scratch = stubs.root / "scratch"
    folder, single = write_tiny_model(scratch)
    shutil.move(str(single), stubs.models / "checkpoints" / "tiny.safetensors")
    shutil.move(str(folder), stubs.models / "diffusers" / "tiny")
    write_tiny_tokenizer(stubs.comfy_dir / "sd1_tokenizer")
    _write_photos(stubs.input / "iddm_photos", small_faces_dir)
    stubs.install()
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]


@pytest.fixture
def clean(env):
    stubs, pack = env
    stubs.progress.clear()
    stubs.messages.clear()
    stubs.memory_calls.clear()
    stubs.interrupted, stubs.interrupt_after = False, None
    for f in (stubs.models / "loras").iterdir():
        f.unlink()
    return stubs, pack


def _errors():
    return sys.modules[f"{PACK}.iddm_core.errors"]


def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def _tiny_workflow(lora_name="test_avatar") -> dict:
    wf = json.loads(API_WORKFLOW.read_text())
    wf["1"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    wf["2"]["inputs"]["resolution"] = 128
    wf["4"]["inputs"].update(T=2, preset="fidelity")          # rho 0.5: one Stage I step, one Stage II step
    wf["5"]["inputs"].update(ckpt_name="tiny.safetensors", K=1, ft_steps=2, resolution=128, prior_preservation=False,
                             lora_name=lora_name)
    return wf


# ------------------------------------------------------------------------------------------------ loading
def test_import_does_not_load_heavy_modules():
    """ComfyUI start-up imports every pack: ours must not pull diffusers/transformers/dlib/kornia."""
    code = (
        "import sys, tempfile; sys.path.insert(0, %r)\n"
        "from comfy_harness import ComfyStubs, load_pack\n"
        "ComfyStubs(tempfile.mkdtemp()).install(); pack = load_pack('comfyui-iddm')\n"
        "assert len(pack.NODE_CLASS_MAPPINGS) >= 4 and pack.WEB_DIRECTORY == './web'\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))\n"
    ) % (str(Path(__file__).parent), HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_node_definitions_follow_comfyui_rules(env):
    _, pack = env
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_problems(name, cls) == [], name
        assert cls.CATEGORY == "IDDM"
    assert pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].OUTPUT_NODE is True


def test_validator_catches_bad_definitions():
    class Bad:
        CATEGORY, FUNCTION, RETURN_TYPES, RETURN_NAMES = "IDDM", "missing", ("IMAGE",), ("a", "b")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"default": 5, "max": 3}), "y": (["a", "b"], {"default": "c"})}}

    problems = "\n".join(node_problems("Bad", Bad))
    for expected in ("x: no tooltip", "outside [min, max]", "not a choice", "RETURN_NAMES", "FUNCTION"):
        assert expected in problems


def test_registers_face_model_folders(env):
    stubs, _ = env
    fp = stubs.modules["folder_paths"]
    assert fp.get_folder_paths("insightface") == [str(stubs.models / "insightface")]
    assert fp.get_folder_paths("facerecognition") == [str(stubs.models / "facerecognition")]


def test_checkpoint_choices_list_files_and_diffusers_folders(env):
    _, pack = env
    choices = pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices[:2] == ["tiny.safetensors", "[diffusers] tiny"]
    # the pack's demo model comes last (a user's checkpoint stays the default) and resolves to the shipped model
    assert len(choices) == 3
    env_module = sys.modules[pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].__module__.rsplit(".", 1)[0] + ".comfy_env"]
    assert env_module.resolve_checkpoint(choices[2]) == "demo"


def test_lora_output_links_to_lora_loader_combo(env):
    _, pack = env
    out_type = pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].RETURN_TYPES[0]
    assert linked_type_ok(out_type, ["a.safetensors", "b.safetensors"])      # LoraLoader's lora_name combo
    assert not linked_type_ok("STRING", ["a.safetensors"])                    # why a plain STRING would not do
    assert not linked_type_ok(out_type, "IMAGE") and not linked_type_ok(out_type, "MODEL")


# --------------------------------------------------------------------------------------------- workflows
def test_ui_workflow_matches_node_definitions(env):
    _, pack = env
    ui = json.loads(UI_WORKFLOW.read_text())
    api = json.loads(API_WORKFLOW.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert {str(i) for i in nodes} == set(api) and {n["type"] for n in ui["nodes"]} >= {
        "CheckpointLoaderSimple", "LoraLoader", "KSampler", "SaveImage", "EmptyLatentImage", "CLIPTextEncode"}
    for node in ui["nodes"]:
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        widgets = [k for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                   if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for name, value in zip(widgets, node["widgets_values"]):
            assert api[str(node["id"])]["inputs"][name] == value, (node["type"], name)
        assert [o["type"] for o in node["outputs"]] == [str(t) for t in cls.RETURN_TYPES]
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
    lora_in = [i for i in nodes[6]["inputs"] if i["name"] == "lora_name"][0]
    assert lora_in["widget"] == {"name": "lora_name"} and api["6"]["inputs"]["lora_name"] == ["5", 0]


def test_api_workflow_end_to_end_on_tiny_model(clean):
    stubs, pack = clean
    from iddm_core.lora import inspect_lora

    results = run_workflow(pack, _tiny_workflow())
    fp = stubs.modules["folder_paths"]
    # LoraLoader (not present here) would receive this value for lora_name: it must resolve to the new file
    lora_name = results["6"]["resolved"]["lora_name"]
    assert lora_name == "test_avatar.safetensors" and lora_name in fp.get_filename_list("loras")
    info = inspect_lora(fp.get_full_path_or_raise("loras", lora_name))
    assert info["compatible"], info["problems"]
    assert info["kind"] == "sd1" and info["rank"] == 4 and info["modules"]["unet"] > 0
    # refs preview: [B, H, W, C] in [0, 1], counts-only summary
    _, faces, summary = results["2"]
    assert tuple(faces.shape) == (4, 128, 128, 3) and 0 <= float(faces.min()) and float(faces.max()) <= 1
    assert "4 photos" in summary and "2 reference" in summary and "2 protected" in summary
    # progress: one update per step, ending at the total (K * (2 * ft_steps + T) = 6)
    train_updates = [p for p in stubs.progress if p[0] == "5"]
    values = [p[1] for p in train_updates]
    assert sorted(set(values)) == list(range(1, 7)) and values == sorted(values) and train_updates[-1][2] == 6
    events = [d for e, d, sid in stubs.messages if e == "iddm.progress"]
    assert events and all(d["node"] == "5" for d in events) and all(sid == "test-client" for *_, sid in stubs.messages)
    pgd = [d for d in events if d["phase"] == "pgd"]
    assert [d["t"] for d in pgd] == [1, 2] and [d["stage"] for d in pgd] == ["rec", "id"]
    assert "dlib" in pgd[-1]["similarity"] and 0 < pgd[-1]["linf"] <= 0.08 + 1e-6
    assert any(d["phase"] == "finetune" and d["loss"] is not None for d in events)
    assert "unload_all_models" in stubs.memory_calls and "soft_empty_cache" in stubs.memory_calls
    # privacy: no photo name in messages, summary text or LoRA metadata
    text = json.dumps([d for _, d, _ in stubs.messages]) + results["5"][1] + summary + json.dumps(info["metadata"])
    assert PRIVATE not in text and "iddm_photos" not in text


def test_cancel_mid_run_leaves_no_lora(clean):
    stubs, pack = clean
    stubs.interrupt_after = 1          # the user presses Cancel during the first step (of 6)
    with pytest.raises(InterruptProcessingException):
        run_workflow(pack, _tiny_workflow("cancelled"))
    assert list((stubs.models / "loras").iterdir()) == []
    assert len([p for p in stubs.progress if p[0] == "5"]) == 1


def test_pgd_preview_returns_protected_images_and_drop(clean):
    stubs, pack = clean
    handle, _, _ = _node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0)
    config, image, text = _node(pack, "IDDMPGDTwoStage").build(
        "custom", 1, 0.5, 0.03, 0.01, refs=handle, preview_ckpt="[diffusers] tiny", preview_resolution=64,
        unique_id="4")
    assert config.rho == 0.5 and config.n_rec == 0          # one Stage II (identity) step
    assert tuple(image.shape) == (2, 64, 64, 3)
    clean_x, _ = handle.at(64).protect()
    delta = (image.permute(0, 3, 1, 2) - clean_x).abs().max()
    assert 0 < float(delta) <= 0.03 + 1e-6
    assert text.startswith("dlib: ") and "->" in text and PRIVATE not in text
    assert [p[1] for p in stubs.progress if p[0] == "4"] == [1]


def test_pgd_without_preview_is_instant_and_preset_sets_rho(env):
    _, pack = env
    config, image, text = _node(pack, "IDDMPGDTwoStage").build("fidelity", 8, 0.1, 0.08, 0.008)
    assert config.rho == 0.5 and "no preview" in text and tuple(image.shape) == (1, 64, 64, 3)
    with pytest.raises(_errors().InputError, match="alpha"):
        _node(pack, "IDDMPGDTwoStage").build("custom", 8, 0.1, 0.01, 0.02)


# ------------------------------------------------------------------------------------------- bad inputs
def test_empty_folder_names_the_folder(env):
    stubs, pack = env
    (stubs.input / "empty").mkdir(exist_ok=True)
    with pytest.raises(_errors().InputError, match="empty"):
        _node(pack, "IDDMLoadPrivateRefs").load("empty", 128, 0, 0)


def test_faceless_photo_is_named_or_skipped(env):
    from PIL import Image

    stubs, pack = env
    folder = stubs.input / "with_faceless"
    if not folder.exists():
        shutil.copytree(stubs.input / "iddm_photos", folder)
        noise = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "zz_noface.png")
    with pytest.raises(_errors().InputError, match="zz_noface.png"):
        _node(pack, "IDDMLoadPrivateRefs").load("with_faceless", 128, 0, 0, skip_faceless=False)
    _, faces, summary = _node(pack, "IDDMLoadPrivateRefs").load(str(folder), 128, 0, 0, skip_faceless=True)
    assert faces.shape[0] == 4 and "1 photo(s) without a detectable face were skipped" in summary
    assert "zz_noface" not in summary
    only = stubs.input / "only_faceless"
    only.mkdir(exist_ok=True)
    shutil.copy(folder / "zz_noface.png", only / "zz_noface.png")
    with pytest.raises(_errors().InputError, match="only_faceless"):
        _node(pack, "IDDMLoadPrivateRefs").load("only_faceless", 128, 0, 0)


def test_missing_checkpoint_names_the_file(clean):
    _, pack = clean
    handle, _, _ = _node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0)
    loss = _node(pack, "IDDMFaceEnsembleLoss").build(0.03, use_dlib=True)[0]
    config = _node(pack, "IDDMPGDTwoStage").build("privacy", 2, 0.1, 0.08, 0.008)[0]
    with pytest.raises(_errors().ModelError, match="missing_model.safetensors"):
        _node(pack, "IDDMTrainLoRA").train("missing_model.safetensors", handle, loss, config, 1, 1, 4, 1e-4, 128, 0,
                                           "x", False, unique_id="5")


def test_existing_lora_is_refused_before_training(clean):
    stubs, pack = clean
    (stubs.models / "loras" / "taken.safetensors").write_bytes(b"keep me")
    handle, _, _ = _node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0)
    loss = _node(pack, "IDDMFaceEnsembleLoss").build(0.03, use_dlib=True)[0]
    config = _node(pack, "IDDMPGDTwoStage").build("privacy", 2, 0.1, 0.08, 0.008)[0]
    train = _node(pack, "IDDMTrainLoRA").train
    with pytest.raises(_errors().InputError, match="taken.safetensors"):
        train("tiny.safetensors", handle, loss, config, 1, 1, 4, 1e-4, 128, 0, "taken", False, unique_id="5")
    with pytest.raises(_errors().InputError, match="lora_name"):
        train("tiny.safetensors", handle, loss, config, 1, 1, 4, 1e-4, 128, 0, "../escape", False, unique_id="5")
    assert (stubs.models / "loras" / "taken.safetensors").read_bytes() == b"keep me"
    assert stubs.memory_calls == []           # nothing was unloaded or loaded


def test_loss_node_discovers_models_in_registered_folders(env):
    stubs, pack = env
    cls = pack.NODE_CLASS_MAPPINGS["IDDMFaceEnsembleLoss"]
    assert "not installed" in cls.INPUT_TYPES()["optional"]["use_arcface"][1]["tooltip"]
    with pytest.raises(_errors().InputError, match="w600k_r50.onnx"):
        cls().build(0.03, use_dlib=True, use_arcface=True)
    with pytest.raises(_errors().InputError, match="at least one"):
        cls().build(0.03, use_dlib=False)
    onnx = stubs.models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(b"placeholder")             # discovery only; nothing is loaded here
    try:
        assert "(installed)" in cls.INPUT_TYPES()["optional"]["use_arcface"][1]["tooltip"]
        spec = cls().build(0.05, use_dlib=True, use_arcface=True)[0]
        assert spec.surrogates == ("dlib", f"arcface:{onnx}") and spec.names == ["dlib", "arcface"]
        assert spec.tau == 0.05
    finally:
        onnx.unlink()
    assert cls.VALIDATE_INPUTS(tau=0.0) != True  # noqa: E712 - ComfyUI treats any non-True as an error message


def test_web_extension_parses():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out = subprocess.run([node, "--check", str(REPO / "web" / "iddm.js")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------- packaging
def test_pyproject_and_install_script_agree_with_requirements(monkeypatch):
    import importlib.util
    import tomllib

    spec = importlib.util.spec_from_file_location("iddm_install", REPO / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = install.requirements()
    assert project["project"]["dependencies"] == reqs and project["project"]["name"] == "comfyui-iddm"
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])
    names = {install.requirement_name(r) for r in reqs}
    assert not names & {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu"} and "numpy" in reqs
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert install.onnxruntime_package() == "onnxruntime-gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert install.onnxruntime_package() == "onnxruntime"
    assert install.install_command(["a"])[:4] == [sys.executable, "-m", "pip", "install"]
