"""The ComfyUI node pack, loaded and run the way ComfyUI does, against stub ComfyUI modules (tests/comfy_harness)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HANG_S, write_private_photos

from comfy_harness import REPO, ComfyStubs, InterruptProcessingException, comfy_error_type, core_nodes, \
    linked_type_ok, load_pack, node_problems, png_chunk_types, png_files, run_workflow, unload_pack

PACK = "comfyui-iddm"
PRIVATE = "secret_alice"          # a private-looking photo name that must never appear in any output
WORKFLOWS = REPO / "example_workflows"
TRAIN_UI, GEN_UI = WORKFLOWS / "iddm_1_train_lora.json", WORKFLOWS / "iddm_2_generate.json"
TRAIN_API, GEN_API = WORKFLOWS / "api" / "iddm_1_train_lora_api.json", WORKFLOWS / "api" / "iddm_2_generate_api.json"
PROTECT_UI, PROTECT_API = WORKFLOWS / "iddm_3_protect_photos.json", WORKFLOWS / "api" / "iddm_3_protect_photos_api.json"
PORTRAITS_UI = WORKFLOWS / "iddm_4_portraits_any_pack_model.json"
PORTRAITS_API = WORKFLOWS / "api" / "iddm_4_portraits_any_pack_model_api.json"
HEAVY = ("diffusers", "transformers", "dlib", "_dlib_pybind11", "kornia")


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_faces_dir):
    """Stub ComfyUI with the tiny model as a single-file checkpoint (+ ComfyUI's tokenizer folder) and as a
    diffusers folder, and four photos in input/iddm_photos; the pack loaded as ComfyUI loads it."""
    from iddm_core.diffusion.tiny import write_tiny_model, write_tiny_tokenizer

    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui"))
    scratch = stubs.root / "scratch"
    folder, single = write_tiny_model(scratch)
    shutil.move(str(single), stubs.models / "checkpoints" / "tiny.safetensors")
    shutil.move(str(folder), stubs.models / "diffusers" / "tiny")
    write_tiny_tokenizer(stubs.comfy_dir / "sd1_tokenizer")
    write_private_photos(stubs.input / "iddm_photos", small_faces_dir, PRIVATE)
    stubs.install()
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    unload_pack(PACK)


@pytest.fixture
def clean(env):
    stubs, pack = env
    stubs.progress.clear()
    stubs.messages.clear()
    stubs.memory_calls.clear()
    stubs.interrupted, stubs.interrupt_after = False, None
    for f in (stubs.models / "loras").iterdir():
        f.unlink()
    for d in (stubs.output, stubs.temp):        # images saved by earlier tests
        shutil.rmtree(d)
        d.mkdir()
    return stubs, pack


def _errors():
    import importlib

    return importlib.import_module(f"{PACK}.iddm_core.errors")


def _result(returned):
    """A node function's outputs: the tuple itself, or the "result" of a {"ui", "result"} dict."""
    return returned["result"] if isinstance(returned, dict) else returned


def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def _tiny_workflow(lora_name="test_avatar") -> dict:
    """The training example (node 1 refs, 3 PGD, 4 train) on the tiny model with tiny settings."""
    wf = json.loads(TRAIN_API.read_text())
    wf["1"]["inputs"]["resolution"] = 128
    wf["3"]["inputs"].update(T=2, preset="fidelity")          # rho 0.5: one Stage I step, one Stage II step
    wf["4"]["inputs"].update(ckpt_name="tiny.safetensors", K=1, ft_steps=2, resolution=128, prior_preservation=False,
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
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
@pytest.mark.parametrize("ui_path, api_path", [(TRAIN_UI, TRAIN_API), (GEN_UI, GEN_API), (PROTECT_UI, PROTECT_API),
                                                (PORTRAITS_UI, PORTRAITS_API)],
                         ids=["train", "generate", "protect", "portraits"])
def test_ui_workflow_matches_node_definitions(env, ui_path, api_path):
    _, pack = env
    ui = json.loads(ui_path.read_text())
    api = json.loads(api_path.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert {str(i) for i in nodes} == set(api)
    for node in ui["nodes"]:
        assert api[str(node["id"])]["class_type"] == node["type"]
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
        assert api[str(dst)]["inputs"][nodes[dst]["inputs"][dst_slot]["name"]] == [str(src), src_slot]


def test_examples_split_training_from_generation(env):
    """Training ends at the LoRA file and saves no image; generation loads the LoRA by file name and saves with the
    pack's no-metadata node; nothing private is in the generation files. ComfyUI lists every
    example_workflows/*.json as a template, so only UI-format files sit there (API twins in api/)."""
    _, pack = env
    train, gen = (json.loads(p.read_text()) for p in (TRAIN_API, GEN_API))
    assert {n["class_type"] for n in train.values()} == {
        "IDDMLoadPrivateRefs", "IDDMFaceEnsembleLoss", "IDDMPGDTwoStage", "IDDMTrainLoRA"}
    refs = train["1"]["inputs"]
    assert refs["folder"] == "iddm_photos" and refs["reference_files"] == refs["protect_files"] == ""
    assert refs["preview_on_node"] is False and train["3"]["inputs"]["preview_ckpt"] == "(none)"
    assert {n["class_type"] for n in gen.values()} == {
        "CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
        "IDDMSaveImageNoMetadata"}
    default_lora = pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].INPUT_TYPES()["required"]["lora_name"][1]["default"]
    assert gen["2"]["inputs"]["lora_name"] == default_lora + ".safetensors"
    for path in (GEN_UI, GEN_API):
        text = path.read_text()
        for private in ("iddm_photos", "IDDMLoadPrivateRefs", "reference_files", "protect_files", "folder", "/home"):
            assert private not in text, (path.name, private)
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == [TRAIN_UI.name, GEN_UI.name, PROTECT_UI.name,
                                                                PORTRAITS_UI.name]
    portraits = PORTRAITS_API.read_text()                   # samples by LoRA file name; nothing of the photos
    assert "IDDMLoadPrivateRefs" not in portraits and "iddm_photos" not in portraits
    assert all("nodes" in json.loads(p.read_text()) for p in WORKFLOWS.glob("*.json"))


def test_protect_example_on_tiny_model(clean, small_faces_dir):
    """The protect example through the harness (ComfyUI's Load Image and Batch Images stubbed) on the tiny model with
    tiny settings: two protected PNGs in output/protected/, pixels only, equal to the node's output."""
    import torch
    from PIL import Image

    stubs, pack = clean
    wf = json.loads(PROTECT_API.read_text())
    assert {n["class_type"] for n in wf.values()} == {"LoadImage", "ImageBatch", "IDDMProtectPhotos",
                                                      "IDDMSaveImageNoMetadata"}
    for i, name in enumerate(("obama.jpg", "biden.jpg"), 1):   # two sizes: Batch Images resizes the second
        Image.open(small_faces_dir / name).convert("RGB").save(stubs.input / f"photo_{i}.png")
    wf["4"]["inputs"].update(ckpt_name="tiny.safetensors", rounds=1, surrogate_steps=1, pgd_steps=2, resolution=32,
                             prior_preservation=False, ratio_steps=2)
    results = run_workflow(pack, wf, core=core_nodes(stubs))
    protected, summary = results["4"]
    assert tuple(protected.shape) == (2, 32, 32, 3) and "aspl + CAP" in summary
    saved = png_files(stubs.output)
    assert [p.parent.name for p in saved] == ["protected"] * 2
    for path, image in zip(saved, protected):
        _assert_pixels_only(path, ["photo_1", "photo_2", str(stubs.root)])
        with Image.open(path) as im:
            assert torch.equal(torch.from_numpy(np.array(im)).float() / 255, image)


def _private_strings(stubs, folder) -> list[str]:
    return [PRIVATE, "iddm_photos", str(folder), str(stubs.root)]


def _assert_pixels_only(path, private) -> None:
    from PIL import Image

    assert not {"tEXt", "zTXt", "iTXt", "eXIf"} & set(png_chunk_types(path)), path
    raw = path.read_bytes()
    with Image.open(path) as im:
        assert im.text == {} and not {"prompt", "workflow"} & set(im.info), path
    assert not any(s.encode() in raw for s in private), path


def test_training_then_generation_workflows_on_tiny_model(clean):
    """Both examples through the harness: training on the tiny model with tiny settings (photos given by absolute
    path and by name, as a user may), then generation with ComfyUI's built-ins stubbed (SaveImage/PreviewImage
    would embed prompt + workflow). The LoRA works, the training saves no image, and no saved PNG carries any text
    chunk, photo folder, photo name or path."""
    stubs, pack = clean
    from iddm_core.training.kohya_check import inspect_lora

    core = core_nodes(stubs)
    folder = stubs.input / "iddm_photos"
    picked = f"{PRIVATE}_0.jpg, {PRIVATE}_1_m.jpg"
    wf = _tiny_workflow()
    wf["1"]["inputs"].update(folder=str(folder), reference_files=picked)
    ui_wf = json.loads(TRAIN_UI.read_text())           # what the frontend sends as extra_pnginfo, same edits
    ui_wf["nodes"][0]["widgets_values"][0], ui_wf["nodes"][0]["widgets_values"][5] = str(folder), picked
    ui: dict = {}
    results = run_workflow(pack, wf, core=core, extra_pnginfo={"workflow": ui_wf}, ui=ui)
    fp = stubs.modules["folder_paths"]
    lora_name = results["4"][0]
    assert lora_name == "test_avatar.safetensors" and lora_name in fp.get_filename_list("loras")
    info = inspect_lora(fp.get_full_path_or_raise("loras", lora_name))
    assert info["compatible"], info["problems"]
    assert info["kind"] == "sd1" and info["rank"] == 4 and info["modules"]["unet"] > 0
    # refs: crops in memory [B, H, W, C] in [0, 1], the summary shown on the node, nothing written
    _, faces, summary = results["1"]
    assert tuple(faces.shape) == (4, 128, 128, 3) and 0 <= float(faces.min()) and float(faces.max()) <= 1
    assert "4 photos" in summary and "2 reference" in summary and "2 protected" in summary
    assert ui["1"] == {"text": [summary]}
    assert png_files(stubs.output, stubs.temp) == []          # the training example saves no image
    # progress: one update per step, ending at the total (K * (2 * ft_steps + T) = 6)
    train_updates = [p for p in stubs.progress if p[0] == "4"]
    values = [p[1] for p in train_updates]
    assert sorted(set(values)) == list(range(1, 7)) and values == sorted(values) and train_updates[-1][2] == 6
    events = [d for e, d, sid in stubs.messages if e == "iddm.progress"]
    assert events and all(d["node"] == "4" for d in events) and all(sid == "test-client" for *_, sid in stubs.messages)
    pgd = [d for d in events if d["phase"] == "pgd"]
    assert [d["t"] for d in pgd] == [1, 2] and [d["stage"] for d in pgd] == ["rec", "id"]
    assert "dlib" in pgd[-1]["similarity"] and 0 < pgd[-1]["linf"] <= 0.08 + 1e-6
    assert any(d["phase"] == "finetune" and d["loss"] is not None for d in events)
    assert "unload_all_models" in stubs.memory_calls and "soft_empty_cache" in stubs.memory_calls
    private = _private_strings(stubs, folder)
    # no photo name or folder in messages, summaries or the LoRA's metadata
    text = json.dumps([d for _, d, _ in stubs.messages]) + results["4"][1] + summary + json.dumps(info["metadata"])
    assert not any(s in text for s in private)
    raw_lora = Path(fp.get_full_path_or_raise("loras", lora_name)).read_bytes()
    assert not any(s.encode() in raw_lora for s in private)

    # generation: the LoRA by file name, portraits saved by the pack's node
    gen = json.loads(GEN_API.read_text())
    gen["1"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    gen["2"]["inputs"]["lora_name"] = lora_name
    gen["5"]["inputs"].update(width=64, height=48, batch_size=2)
    out = run_workflow(pack, gen, core=core, extra_pnginfo={"workflow": json.loads(GEN_UI.read_text())}, ui=ui)
    assert out["2"][0]["loras"] == [lora_name] and out["3"][0]["loras"] == [lora_name]
    saved = png_files(stubs.output, stubs.temp)
    assert [p.name for p in saved] == ["iddm_portrait_00001_.png", "iddm_portrait_00002_.png"]
    assert ui["8"] == {"images": [{"filename": p.name, "subfolder": "", "type": "output"} for p in saved]}
    for path in saved:
        _assert_pixels_only(path, private)


def test_save_image_stub_leaks_like_comfyui(clean):
    """Why the examples are split: ComfyUI's Save Image after Load Private Refs (the harness stub embeds as
    ComfyUI does) writes the photo folder and names into the PNG; with --disable-metadata it does not."""
    from PIL import Image

    stubs, pack = clean
    folder = stubs.input / "iddm_photos"
    wf = {"1": {"class_type": "IDDMLoadPrivateRefs",
                "inputs": {"folder": str(folder), "resolution": 64, "split_seed": 0, "n_reference": 0,
                           "reference_files": f"{PRIVATE}_0.jpg, {PRIVATE}_1.jpg"}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "leak"}}}
    run_workflow(pack, wf, core=core_nodes(stubs), extra_pnginfo={"workflow": {"nodes": []}})
    leaked = png_files(stubs.output)
    assert len(leaked) == 4
    with Image.open(leaked[0]) as im:
        assert str(folder) in im.text["prompt"] and PRIVATE in im.text["prompt"] and "workflow" in im.text
    run_workflow(pack, wf, core=core_nodes(stubs, embed_metadata=False))
    with Image.open(png_files(stubs.output)[-1]) as im:
        assert im.text == {}


def test_save_node_writes_pngs_without_any_text_chunk(clean):
    import torch
    from PIL import Image

    stubs, pack = clean
    cls = pack.NODE_CLASS_MAPPINGS["IDDMSaveImageNoMetadata"]
    assert cls.OUTPUT_NODE is True and "hidden" not in cls.INPUT_TYPES()       # never receives prompt/workflow
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    shown = cls().save(images, "portraits/me")["ui"]["images"]
    assert shown == [{"filename": f"me_0000{i}_.png", "subfolder": "portraits", "type": "output"} for i in (1, 2, 3)]
    for entry, image in zip(shown, images):
        path = stubs.output / "portraits" / entry["filename"]
        assert set(png_chunk_types(path)) == {"IHDR", "IDAT", "IEND"}
        with Image.open(path) as im:
            assert im.text == {} and im.mode == "RGB"
            assert np.array_equal(np.array(im), image.mul(255).round().to(torch.uint8).numpy())
    cls().save(images[:1], "portraits/me")                                     # the counter goes on
    assert sorted(os.listdir(stubs.output / "portraits")) == [f"me_0000{i}_.png" for i in (1, 2, 3, 4)]
    with pytest.raises(Exception, match="outside"):
        cls().save(images[:1], "../escape")
    assert not (stubs.root / "escape_00001_.png").exists()


def test_refs_node_writes_nothing_to_temp_by_default(clean):
    stubs, pack = clean
    cls = pack.NODE_CLASS_MAPPINGS["IDDMLoadPrivateRefs"]
    optional = cls.INPUT_TYPES()["optional"]
    assert list(optional)[-1] == "preview_on_node" and optional["preview_on_node"][1]["default"] is False
    before = sorted(stubs.temp.rglob("*")), sorted(stubs.output.rglob("*"))
    returned = cls().load("iddm_photos", 64, 0, 0)
    assert (sorted(stubs.temp.rglob("*")), sorted(stubs.output.rglob("*"))) == before
    _, faces, summary = returned["result"]
    assert returned["ui"] == {"text": [summary]} and tuple(faces.shape) == (4, 64, 64, 3)
    # only the explicit switch shows the crops on the node, via temp files that carry pixels only
    shown = cls().load("iddm_photos", 64, 0, 0, preview_on_node=True)["ui"]["images"]
    assert len(shown) == 4 and all(e["type"] == "temp" and PRIVATE not in e["filename"] for e in shown)
    for e in shown:
        _assert_pixels_only(stubs.temp / e["subfolder"] / e["filename"], [PRIVATE, str(stubs.root)])


def test_errors_show_as_plain_type_names_in_comfyui(clean):
    """ComfyUI names an exception by module + class unless the module is builtins; the pack is imported under its
    folder path, so library errors would read "<path>.iddm_core.errors.InputError". They read "InputError"."""
    import pickle

    stubs, pack = clean
    errors = _errors()
    with pytest.raises(errors.InputError) as caught:
        _node(pack, "IDDMLoadPrivateRefs").load("no_such_folder", 128, 0, 0)
    line = f"{comfy_error_type(caught.type)}: {caught.value}"
    assert line.startswith("InputError: ") and "no_such_folder" in line and isinstance(caught.value, ValueError)
    for cls in pack.NODE_CLASS_MAPPINGS.values():          # every node, the train node included
        assert getattr(getattr(cls, cls.FUNCTION), "_iddm_plain_errors", False), cls
    assert any(frame.name == "_load" for frame in __import__("traceback").extract_tb(caught.tb))   # frames kept
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is errors.InputError and again.args == caught.value.args
    handle = _result(_node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 64, 0, 0))[0]
    loss = _node(pack, "IDDMFaceEnsembleLoss").build(0.03, use_dlib=True)[0]
    config = _result(_node(pack, "IDDMPGDTwoStage").build("privacy", 2, 0.1, 0.08, 0.008))[0]
    with pytest.raises(errors.ModelError) as caught:
        _node(pack, "IDDMTrainLoRA").train("missing.safetensors", handle, loss, config, 1, 1, 4, 1e-4, 64, 0, "x",
                                           False, unique_id="4")
    assert comfy_error_type(caught.type) == "ModelError" and "missing.safetensors" in str(caught.value)
    with pytest.raises(errors.InputError) as caught:
        _node(pack, "IDDMPGDTwoStage").build("custom", 8, 0.1, 0.01, 0.02)
    assert comfy_error_type(caught.type) == "InputError" and "alpha" in str(caught.value)


def test_cancel_mid_run_leaves_no_lora(clean):
    stubs, pack = clean
    stubs.interrupt_after = 1          # the user presses Cancel during the first step (of 6)
    with pytest.raises(InterruptProcessingException):
        run_workflow(pack, _tiny_workflow("cancelled"))
    assert list((stubs.models / "loras").iterdir()) == []
    assert len([p for p in stubs.progress if p[0] == "4"]) == 1


def test_pgd_preview_returns_protected_images_and_drop(clean):
    stubs, pack = clean
    handle, _, _ = _result(_node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0))
    config, image, text = _result(_node(pack, "IDDMPGDTwoStage").build(
        "custom", 1, 0.5, 0.03, 0.01, refs=handle, preview_ckpt="[diffusers] tiny", preview_resolution=64,
        unique_id="4"))
    assert config.rho == 0.5 and config.n_rec == 0          # one Stage II (identity) step
    assert tuple(image.shape) == (2, 64, 64, 3)
    clean_x, _ = handle.at(64).protect()
    delta = (image.permute(0, 3, 1, 2) - clean_x).abs().max()
    assert 0 < float(delta) <= 0.03 + 1e-6
    assert text.startswith("dlib: ") and "->" in text and PRIVATE not in text
    assert [p[1] for p in stubs.progress if p[0] == "4"] == [1]


def test_pgd_without_preview_is_instant_and_preset_sets_rho(env):
    _, pack = env
    config, image, text = _result(_node(pack, "IDDMPGDTwoStage").build("fidelity", 8, 0.1, 0.08, 0.008))
    assert config.rho == 0.5 and "no preview" in text and tuple(image.shape) == (1, 64, 64, 3)
    with pytest.raises(_errors().InputError, match="alpha"):
        _node(pack, "IDDMPGDTwoStage").build("custom", 8, 0.1, 0.01, 0.02)


def test_pgd_node_states_the_rho_in_effect(env):
    """A named preset overrides the rho widget: the node's text (output and on the node) says so."""
    _, pack = env
    build = _node(pack, "IDDMPGDTwoStage").build
    returned = build("fidelity", 8, 0.1, 0.08, 0.008)
    text = _result(returned)[2]
    assert "rho 0.5 (Stage I 4 + Stage II 4 of T=8 steps)" in text
    assert "the rho widget (0.1) is not used: preset 'fidelity' sets rho 0.5" in text
    assert returned["ui"] == {"text": [text]}
    custom = _result(build("custom", 8, 0.2, 0.08, 0.008))[2]
    assert "rho 0.2 (Stage I 1 + Stage II 7 of T=8 steps)" in custom and "not used" not in custom
    same = _result(build("privacy", 8, 0.1, 0.08, 0.008))[2]
    assert "rho 0.1" in same and "not used" not in same
    fast = _result(build("fast", 8, 0.1, 0.08, 0.008, gradient="full"))[2]
    assert "gradient fast" in fast and "the gradient widget (full) is not used" in fast


def test_leak_meter_states_its_threshold(env):
    """Threshold 0 means "the judge's own": the tooltip lists each recogniser's value and the summary states the
    value in effect (3 decimals: dlib's 0.911 must not print as 0.91)."""
    _, pack = env
    mod = sys.modules[f"{PACK}.nodes.leak_meter"]
    tip = pack.NODE_CLASS_MAPPINGS["IDDMIdentityLeakMeter"].INPUT_TYPES()["required"]["threshold"][1]["tooltip"]
    assert "dlib 0.911" in tip and "faceres 0.615" in tip and "mobileface 0.379" in tip and "others 0.4" in tip
    assert mod.resolve_threshold(0.0, "dlib")[0] == 0.911 and mod.resolve_threshold(0.0, "irse50")[0] == 0.4
    assert mod.resolve_threshold(0.8, "dlib") == (0.8, "set on the node")
    result = {"n_images": 3, "faces_found": [True, True, False], "fsr": 2 / 3,
              "recognizers": {"dlib": {"ism": 0.92, "similarity": [0.93, 0.912, None]}}}
    auto = mod.summary_text(result, "dlib", *mod.resolve_threshold(0.0, "dlib"))
    assert "match rule [dlib]: cosine >= 0.911 (dlib's own; threshold 0 = auto)" in auto
    assert "recognised as the user by dlib (cosine >= 0.911): 2/2" in auto
    strict = mod.summary_text(result, "dlib", *mod.resolve_threshold(0.92, "dlib"))
    assert "cosine >= 0.92 (set on the node)" in strict and "(cosine >= 0.92): 1/2" in strict
    # evaluate's own verdicts: dlib by its distance (<= 0.6) when the threshold is auto, whatever the cosines say
    result["recognizers"]["dlib"].update(match={"score": "distance", "threshold": 0.6}, matched=[False, True, None])
    auto = mod.summary_text(result, "dlib", *mod.resolve_threshold(0.0, "dlib"))
    assert "match rule [dlib]: distance <= 0.6 (dlib's own; threshold 0 = auto)" in auto
    assert "recognised as the user by dlib (distance <= 0.6): 1/2" in auto and "cosine level 0.911" in auto
    assert mod.verdicts(result["recognizers"]["dlib"], 0.911, "dlib's own; threshold 0 = auto") == [False, True, None]
    strict = mod.summary_text(result, "dlib", *mod.resolve_threshold(0.92, "dlib"))
    assert "(cosine >= 0.92): 1/2" in strict
    assert mod.verdicts(result["recognizers"]["dlib"], 0.92, "set on the node") == [True, False, None]


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
    returned = _node(pack, "IDDMLoadPrivateRefs").load(str(folder), 128, 0, 0, skip_faceless=True)
    handle, faces, summary = returned["result"]
    # the dropped photo is shown to the user by its position (ComfyUI keeps node text and outputs in /history)
    assert faces.shape[0] == 4 and "1 photo(s) without a detectable face were skipped: #5 of the folder's 5" in summary
    assert returned["ui"]["text"] == [summary] and PRIVATE not in summary and "zz_noface" not in summary
    # an execution error's inputs (their repr) are kept in /history too: neither folder nor file names in it
    for shown in (repr(handle), str(handle), repr(handle.at(128))):
        assert "with_faceless" not in shown and "zz_noface" not in shown and str(stubs.input) not in shown
    only = stubs.input / "only_faceless"
    only.mkdir(exist_ok=True)
    shutil.copy(folder / "zz_noface.png", only / "zz_noface.png")
    with pytest.raises(_errors().InputError, match="only_faceless"):
        _node(pack, "IDDMLoadPrivateRefs").load("only_faceless", 128, 0, 0)


def test_missing_checkpoint_names_the_file(clean):
    _, pack = clean
    handle, _, _ = _result(_node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0))
    loss = _node(pack, "IDDMFaceEnsembleLoss").build(0.03, use_dlib=True)[0]
    config = _result(_node(pack, "IDDMPGDTwoStage").build("privacy", 2, 0.1, 0.08, 0.008))[0]
    with pytest.raises(_errors().ModelError, match="missing_model.safetensors"):
        _node(pack, "IDDMTrainLoRA").train("missing_model.safetensors", handle, loss, config, 1, 1, 4, 1e-4, 128, 0,
                                           "x", False, unique_id="5")


def test_existing_lora_is_refused_before_training(clean):
    stubs, pack = clean
    (stubs.models / "loras" / "taken.safetensors").write_bytes(b"keep me")
    handle, _, _ = _result(_node(pack, "IDDMLoadPrivateRefs").load("iddm_photos", 128, 0, 0))
    loss = _node(pack, "IDDMFaceEnsembleLoss").build(0.03, use_dlib=True)[0]
    config = _result(_node(pack, "IDDMPGDTwoStage").build("privacy", 2, 0.1, 0.08, 0.008))[0]
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


def test_sdxl_checkpoint_is_listed_and_trains_at_its_native_resolution(clean):
    """An SDXL single file in models/checkpoints (tokenizers: ComfyUI's bundled CLIP vocabulary, for both towers)
    is offered by the train node and trained through it; resolution 0 = the model's native size; the LoRA is a
    kohya SDXL LoRA."""
    stubs, pack = clean
    from iddm_core.training.kohya_check import inspect_lora
    from iddm_core.diffusion.tiny import TINY_RESOLUTION, write_tiny_model

    _, single = write_tiny_model(stubs.root / "scratch_xl", kind="sdxl")
    target = stubs.models / "checkpoints" / "tiny-sdxl.safetensors"
    shutil.move(str(single), target)
    try:
        spec = pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].INPUT_TYPES()["required"]
        assert "tiny-sdxl.safetensors" in spec["ckpt_name"][0]
        wf = _tiny_workflow("xl_avatar")
        wf["4"]["inputs"].update(ckpt_name="tiny-sdxl.safetensors", resolution=0, ft_steps=1)
        results = run_workflow(pack, wf)
    finally:
        target.unlink()
    fp = stubs.modules["folder_paths"]
    assert results["4"][0] == "xl_avatar.safetensors"
    info = inspect_lora(fp.get_full_path_or_raise("loras", "xl_avatar.safetensors"))
    assert info["compatible"], info["problems"]
    assert info["kind"] == "sdxl" and info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert f"at {TINY_RESOLUTION}px" in results["4"][1]
    assert "unload_all_models" in stubs.memory_calls
