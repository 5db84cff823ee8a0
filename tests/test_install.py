"""install.py's plan under a host's pins, and iddm_core.requirements_check (no pip, no network).

The end-to-end run in a real A1111 1.10 environment (torch 2.1.2, its pins) is tests/test_host_pins.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
A1111_PINS = Path(__file__).with_name("a1111_v1.10.1_requirements_versions.txt")


def _install_module():
    spec = importlib.util.spec_from_file_location("iddm_install_under_test", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def install():
    return _install_module()


def _names(lines, install):
    return {install.requirement_name(line): line for line in lines}


def test_a1111_110_pins_cap_diffusers_peft_and_onnx(install):
    """A1111 1.10.1's own requirements_versions.txt and its torch 2.1.2: diffusers < 0.36 (torch.xpu), peft < 0.14
    (transformers 4.30.2), onnx < 1.13 (protobuf 3.20.0); transformers and kornia are left to the web UI."""
    host = install.host_versions(A1111_PINS, upgrading=set())
    assert (host["transformers"], host["accelerate"], host["protobuf"]) == ("4.30.2", "0.21.0", "3.20.0")
    host["torch"] = "2.1.2+cu121"                        # A1111 1.10's TORCH_COMMAND
    packages, reasons = install.apply_caps(install.requirements(), install.requirements_check().caps(host))
    lines = _names(packages, install)
    assert lines["diffusers"] == "diffusers>=0.30,<0.36"
    assert lines["peft"] == "peft>=0.11,<0.14"
    assert lines["onnx"] == "onnx<1.13"                   # the floor of requirements.txt (1.14) cannot hold
    assert "torch.xpu" in reasons[lines["diffusers"]] and "2.1.2" in reasons[lines["diffusers"]]
    assert "4.30.2" in reasons[lines["peft"]] and "0.21.0" in reasons[lines["peft"]]
    assert "3.20.0" in reasons[lines["onnx"]]
    # the lines that are not capped are unchanged
    assert {k: v for k, v in lines.items() if k not in ("diffusers", "peft", "onnx")} == \
        {k: v for k, v in _names(install.requirements(), install).items() if k not in ("diffusers", "peft", "onnx")}


def test_new_hosts_get_no_caps(install):
    rc = install.requirements_check()
    assert rc.caps({"torch": "2.7.1+cu128", "transformers": "4.57.6", "accelerate": "1.14.0",
                    "protobuf": "4.25.9"}) == {}
    # unknown versions (not installed, or about to be upgraded by this very install) cap nothing
    assert rc.caps({"torch": None, "transformers": None, "accelerate": None, "protobuf": None}) == {}
    # only the host package that is too old matters: accelerate 0.31 alone caps peft below 0.15, not 0.14
    assert rc.caps({"torch": "2.4.0", "transformers": "4.46.1", "accelerate": "0.31.0"}) == \
        {"peft": [("<0.15", rc.caps({"accelerate": "0.31.0"})["peft"][0][1])]}


def test_boundaries_are_exact(install):
    rc = install.requirements_check()
    below = {"torch": "2.2.2", "transformers": "4.42.4", "accelerate": "0.31.0", "protobuf": "3.20.1"}
    at = {"torch": "2.3.0", "transformers": "4.43.0", "accelerate": "0.32.0", "protobuf": "3.20.2"}
    assert set(rc.caps(below)) == {"diffusers", "peft", "onnx"}
    assert rc.caps(at) == {}
    assert rc.release("2.1.2+cu121") == (2, 1, 2) and rc.release("0.36.0.dev0") == (0, 36, 0)


def test_unpinned_host_packages(install, monkeypatch):
    """Without pins: torch and accelerate count as installed (we never change them); transformers only when this
    install leaves it alone; protobuf never (pip simply upgrades it for onnx)."""
    rc = install.requirements_check()
    have = {"torch": "2.1.2", "transformers": "4.30.2", "accelerate": "0.21.0", "protobuf": "3.20.0"}
    monkeypatch.setattr(rc, "installed_version", lambda name: have.get(name))
    monkeypatch.setattr(install, "requirements_check", lambda: rc)
    assert install.host_versions(None, upgrading={"transformers"}) == \
        {"torch": "2.1.2", "transformers": None, "accelerate": "0.21.0", "protobuf": None}
    assert install.host_versions(None, upgrading=set())["transformers"] == "4.30.2"


def test_forge_classic_and_neo_pin_in_requirements_txt(install, tmp_path, monkeypatch):
    webui = tmp_path / "forge"
    (webui / "extensions" / "iddm").mkdir(parents=True)
    (webui / "modules_forge").mkdir()
    (webui / "launch.py").write_text("")
    (webui / "requirements.txt").write_text("diffusers==0.37.1\ntransformers==4.57.6\nprotobuf==4.25.9  # x\ntorch\n")
    monkeypatch.setattr(install, "HERE", webui / "extensions" / "iddm")
    monkeypatch.chdir(tmp_path)
    assert install.webui_pins_file() == webui / "requirements.txt"
    assert install.pinned_versions(webui / "requirements.txt") == \
        {"diffusers": "0.37.1", "transformers": "4.57.6", "protobuf": "4.25.9"}
    # plain A1111 has a requirements.txt too, but its pins are requirements_versions.txt
    (webui / "requirements_versions.txt").write_text("transformers==4.30.2\n")
    assert install.webui_pins_file() == webui / "requirements_versions.txt"


def test_capped_keeps_extras_markers_and_drops_an_impossible_floor(install):
    assert install.capped("diffusers>=0.30", ["<0.36"]) == "diffusers>=0.30,<0.36"
    assert install.capped("peft>=0.11", ["<0.15", "<0.14"]) == "peft>=0.11,<0.14"
    assert install.capped("onnx>=1.14", ["<1.13"]) == "onnx<1.13"
    assert install.capped("pkg[extra]>=1; sys_platform != 'win32'", ["<2"]) == "pkg[extra]>=1,<2; sys_platform != 'win32'"


def _fake_pip(install, monkeypatch, fail=()):
    """pip replaced: records each call; packages whose name is in ``fail`` fail like pip does."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        bad = [arg for arg in cmd if install.requirement_name(arg) in fail]
        out = "\n".join(f"ERROR: No matching distribution found for {arg}" for arg in bad)

        class Done:
            returncode = 1 if bad else 0
            stdout = ("Collecting x\n" * 40) + out             # a wall that must not reach the console
        return Done()

    monkeypatch.setattr(install.subprocess, "run", run)
    monkeypatch.setattr(install.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(install, "install_faceres", lambda: None)
    return calls


def test_an_impossible_optional_package_is_told_once_and_not_retried(install, tmp_path, monkeypatch, capsys):
    """onnx under A1111's protobuf pin on a Python without onnx 1.12 wheels: one line naming what it disables;
    the next start runs no pip for it and says so in one line; the other packages are installed."""
    monkeypatch.setattr(install, "HERE", tmp_path)                       # the state file goes here
    monkeypatch.setattr(install, "requirements", lambda: ["onnx<1.13", "brand-new-pkg-iddm>=1"])
    monkeypatch.setattr(install, "onnxruntime_package", lambda: "onnxruntime")
    monkeypatch.setattr(install, "installed", lambda name: name == "onnxruntime")
    monkeypatch.setattr(install, "verify", lambda: None)
    calls = _fake_pip(install, monkeypatch, fail={"onnx"})
    assert install.main() == 0                                           # optional: the start is not failed
    out = capsys.readouterr().out
    assert "Collecting" not in out                                       # pip's own output is kept back
    told = [line for line in out.splitlines() if line.startswith("[IDDM] onnx")]
    assert len(told) == 1 and "arcface" in told[0] and "No matching distribution" in told[0]
    assert any("brand-new-pkg-iddm>=1" in cmd for cmd in calls[-2:])     # the rest was tried on its own
    assert (tmp_path / install.STATE_FILE).is_file()

    calls.clear()
    monkeypatch.setattr(install, "requirements", lambda: ["onnx<1.13"])
    assert install.main() == 0
    out = capsys.readouterr().out
    assert calls == []                                                   # not retried
    assert len(out.splitlines()) == 1 and "not tried again" in out and install.STATE_FILE in out


def test_a_failed_required_package_fails_the_start(install, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install, "HERE", tmp_path)
    monkeypatch.setattr(install, "requirements", lambda: ["diffusers-iddm-missing>=1"])
    monkeypatch.setattr(install, "onnxruntime_package", lambda: "onnxruntime")
    monkeypatch.setattr(install, "installed", lambda name: name == "onnxruntime")
    _fake_pip(install, monkeypatch, fail={"diffusers-iddm-missing"})
    assert install.main() == 1
    out = capsys.readouterr().out
    assert "diffusers-iddm-missing>=1 cannot be installed" in out and "python -m pip install" in out


def test_verify_reports_what_to_do(install, tmp_path, monkeypatch, capsys):
    """After installing, a library that does not import is reported with the checker's advice."""
    monkeypatch.setattr(install, "HERE", tmp_path)
    monkeypatch.setattr(install, "requirements", lambda: ["brand-new-pkg-iddm>=1"])
    monkeypatch.setattr(install, "onnxruntime_package", lambda: "onnxruntime")
    monkeypatch.setattr(install, "installed", lambda name: name == "onnxruntime")
    _fake_pip(install, monkeypatch)
    monkeypatch.setattr(install, "verify", lambda: "diffusers cannot be imported (...). Fix: ...")
    assert install.main() == 1
    assert "cannot start: diffusers cannot be imported" in capsys.readouterr().out


def test_verify_runs_the_real_check_in_a_fresh_python(install):
    """The real subprocess check in this environment, where everything imports."""
    assert install.verify() is None


# ------------------------------------------------------------------------------- iddm_core.requirements_check
def test_explain_names_versions_and_fix():
    from iddm_core import requirements_check as rc

    versions = {"torch": "2.1.2+cu121", "diffusers": "0.37.1", "peft": "0.21.2", "transformers": "4.30.2",
                "accelerate": "0.21.0", "protobuf": "3.20.0"}
    text = rc.explain("diffusers", AttributeError("module 'torch' has no attribute 'xpu'"), versions)
    for part in ("torch 2.1.2+cu121", "diffusers 0.37.1", "peft 0.21.2", "transformers 4.30.2", "torch.xpu",
                 'python -m pip install "diffusers<0.36" "peft<0.14"'):
        assert part in text, part
    missing = rc.explain("onnx", ModuleNotFoundError("No module named 'onnx'"), dict(versions, onnx=None))
    assert "onnx is not installed" in missing and "onnx<1.13" in missing and "3.20.0" in missing
    # nothing known explains it: the generic advice, still with the versions
    other = rc.explain("peft", ImportError("boom"), dict(versions, peft="0.13.2", diffusers="0.35.2"))
    assert "peft 0.13.2" in other and "docs/a1111.md" in other


def test_require_turns_import_failures_into_one_clear_error(monkeypatch):
    from iddm_core import requirements_check as rc
    from iddm_core.errors import ModelError

    def broken(name):
        raise AttributeError("module 'torch' has no attribute 'xpu'")

    monkeypatch.setattr(rc.importlib, "import_module", broken)
    monkeypatch.setattr(rc, "_IMPORTED", set())
    with pytest.raises(ModelError, match=r"diffusers cannot be imported \(AttributeError: module 'torch' has no "
                                         r"attribute 'xpu'\)\. Installed: torch "):
        rc.require("diffusers")
    monkeypatch.undo()
    rc.require("json")                                                   # a module that imports: no error
    assert "json" in rc._IMPORTED


def test_requirements_check_loads_without_the_package():
    """install.py loads it by path before anything is installed: it must not need iddm_core's other modules."""
    spec = importlib.util.spec_from_file_location("rc_alone", REPO / "iddm_core" / "requirements_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert issubclass(module.RequirementsError, RuntimeError)
    assert sys.modules.get("rc_alone") is None
