"""The pack inside a real AUTOMATIC1111 1.10 Python environment: torch 2.1.2 and A1111 1.10.1's pins.

What it does, in a virtual environment of its own (built once, kept in tests/.hostpins_cache/, ~4.7 GB: torch
2.1.2 from PyPI is the CUDA build with its nvidia-* wheels; no CPU build of 2.1.2 is on PyPI and
download.pytorch.org is not reachable from CI; ~4-5 min to build on 2 cores, then reused):

1. torch 2.1.2 and the A1111 pins that matter to the pack (accelerate 0.21.0, transformers 4.30.2, protobuf
   3.20.0, numpy 1.26.2, Pillow 9.5.0, kornia 0.6.7, safetensors 0.4.2), installed with A1111 1.10.1's whole
   requirements_versions.txt as constraints (tests/a1111_v1.10.1_requirements_versions.txt);
2. what the previous install.py left there (diffusers 0.37.1, peft 0.21.2, installed without their
   dependencies), and the CLI's error for it: one line naming the versions and the fix;
3. install.py, run as A1111 runs it (from the web UI's folder; the pack in ``extensions/``): it must install
   diffusers < 0.36 and peft < 0.14, leave every pin alone, tell in one line that onnx cannot be installed (this
   Python has no onnx 1.12 wheel) and print no pip resolver output; a second start runs no pip;
4. ``python -m iddm_core tiny-model`` and a short ``train`` (K 1, T 2, one fine-tune step, 64 px) on that
   environment: a LoRA file.

Not covered: a GPU, Python 3.10 (A1111's own; there onnx 1.12.0 would be installed), the web UI process itself
(tests/test_a1111.py covers the tab), the other A1111 packages (gradio, open-clip, ...) that never meet the pack.
It skips only when PyPI cannot be reached, saying so.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PINS = Path(__file__).with_name("a1111_v1.10.1_requirements_versions.txt")
CACHE = Path(os.environ.get("IDDM_HOSTPINS_CACHE", Path(__file__).with_name(".hostpins_cache")))
# A1111 1.10's torch (launch_utils.py TORCH_COMMAND) and the pins of requirements_versions.txt the pack meets
BASE = ("torch==2.1.2", "accelerate==0.21.0", "transformers==4.30.2", "protobuf==3.20.0", "numpy==1.26.2",
        "Pillow==9.5.0", "kornia==0.6.7", "safetensors==0.4.2")
OLD_INSTALL = ("diffusers==0.37.1", "peft==0.21.2")      # what install.py put there before it knew the pins
HANG = 3600                                              # seconds: only to stop a hung pip, never to judge speed


def _key() -> str:
    digest = hashlib.sha256(PINS.read_bytes() + "\n".join(BASE).encode() + sys.version.encode())
    return digest.hexdigest()[:16]


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=HANG)


def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=120) as response:
            return response.status == 200
    except OSError:
        return False


def build_env() -> Path:
    """The cached environment (built when missing). Returns its folder."""
    env_dir = CACHE / f"a1111-1.10-{_key()}"
    done = env_dir / ".complete"
    if done.is_file():
        return env_dir
    shutil.rmtree(env_dir, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True).create(env_dir)
    result = _run([_python(env_dir), "-m", "pip", "install", "-q", *BASE, "-c", PINS])
    assert result.returncode == 0, f"building the A1111 1.10 environment failed:\n{result.stdout[-4000:]}"
    done.write_text("\n".join(BASE) + "\n")
    return env_dir


def versions(python: Path, *names: str) -> dict:
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            f"print(json.dumps({{n: v(n) for n in {list(names)!r}}}))")
    result = _run([python, "-c", code])
    assert result.returncode == 0, result.stdout
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def fake_webui(root: Path) -> Path:
    """An A1111 folder (launch.py, requirements_versions.txt) with the pack in extensions/iddm: install.py,
    requirements.txt and iddm_core (a link: install.py reads its requirements_check.py and faceres' files)."""
    webui = root / "webui"
    ext = webui / "extensions" / "iddm"
    ext.mkdir(parents=True)
    (webui / "launch.py").write_text("")
    shutil.copy(PINS, webui / "requirements_versions.txt")
    for name in ("install.py", "requirements.txt"):
        shutil.copy(REPO / name, ext / name)
    (ext / "iddm_core").symlink_to(REPO / "iddm_core", target_is_directory=True)
    return webui


@pytest.fixture(scope="module")
def a1111_env():
    if not pypi_reachable():
        message = "NETWORK: pypi.org is unreachable, the A1111 1.10 environment test (tests/test_host_pins.py) is SKIPPED"
        print(f"\n{'!' * 20} {message} {'!' * 20}", file=sys.stderr)
        pytest.skip(message)
    return build_env()


def test_a1111_110_pins_install_and_train(a1111_env, tmp_path):
    python = _python(a1111_env)
    env = dict(os.environ, IDDM_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH="")
    pinned = versions(python, "torch", "accelerate", "transformers", "protobuf", "numpy", "Pillow", "kornia",
                      "safetensors")
    assert pinned["torch"].startswith("2.1.2") and pinned["transformers"] == "4.30.2"

    # what the old install.py left: diffusers / peft too new for this torch / transformers / accelerate
    result = _run([python, "-m", "pip", "install", "-q", "--no-deps", *OLD_INSTALL])
    assert result.returncode == 0, result.stdout[-3000:]
    result = _run([python, "-m", "iddm_core", "tiny-model", tmp_path / "broken"], cwd=REPO, env=env)
    assert result.returncode != 0
    # one clear line, no traceback
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    error = [line for line in result.stdout.splitlines() if line.strip()][-1]
    # whichever of the two is imported first is named first; the line then names every misfit and the fix
    assert ("diffusers cannot be imported (AttributeError: module 'torch' has no attribute 'xpu')" in error
            or "peft cannot be imported (ImportError: cannot import name 'clear_device_cache'" in error), \
        result.stdout[-3000:]
    assert "reads torch.xpu when imported" in error and "imports transformers.EncoderDecoderCache" in error, error
    for part in ("torch 2.1.2", "diffusers 0.37.1", "transformers 4.30.2", '"diffusers<0.36"', '"peft<0.14"'):
        assert part in error, (part, error)

    # install.py as A1111 runs it: from the web UI's folder, at every start
    webui = fake_webui(tmp_path)
    install = webui / "extensions" / "iddm" / "install.py"
    first = _run([python, install], cwd=webui, env=env)
    out = first.stdout
    assert first.returncode == 0, out[-4000:]
    assert "[IDDM] diffusers>=0.30,<0.36: diffusers 0.36+ reads torch.xpu" in out
    assert "[IDDM] peft>=0.11,<0.14:" in out
    onnx_lines = [line for line in out.splitlines() if line.startswith("[IDDM] onnx")]
    assert any("arcface" in line for line in onnx_lines), out
    assert "ResolutionImpossible" not in out and "Collecting" not in out     # no pip wall
    assert len(out.splitlines()) <= 12, out
    assert "cannot start" not in out                                        # the import check passed
    after = versions(python, "torch", "accelerate", "transformers", "protobuf", "numpy", "Pillow", "kornia",
                     "safetensors", "diffusers", "peft", "onnx")
    assert {k: after[k] for k in pinned} == pinned                          # no pin changed
    assert tuple(map(int, after["diffusers"].split(".")[:2])) < (0, 36)
    assert tuple(map(int, after["peft"].split(".")[:2])) < (0, 14)
    assert after["onnx"] is None

    second = _run([python, install], cwd=webui, env=env)
    assert second.returncode == 0 and "installing:" not in second.stdout, second.stdout
    assert "not tried again" in second.stdout and len(second.stdout.splitlines()) <= 4, second.stdout

    # the library on it: the tiny model, then IDDM training for a moment
    model = tmp_path / "m"
    result = _run([python, "-m", "iddm_core", "tiny-model", model], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    lora = tmp_path / "me.safetensors"
    result = _run([python, "-m", "iddm_core", "train", "--refs", REPO / "iddm_core" / "assets" / "faces", "--out",
                   lora, "--model", model / "tiny.safetensors", "--K", "1", "--T", "2", "--ft-steps", "1",
                   "--no-prior", "--resolution", "64", "--device", "cpu"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    assert lora.is_file() and lora.stat().st_size > 1000


if __name__ == "__main__":          # .ci/run builds the environment ahead of the test run (timed apart)
    print(build_env())
