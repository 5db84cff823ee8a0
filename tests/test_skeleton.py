import subprocess
import sys

from conftest import ROOT


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "iddm_core", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "COMMAND" in out.stdout


def test_atomic_write_refuses_existing(tmp_path):
    from iddm_core.atomic import atomic_write
    from iddm_core.errors import InputError

    target = tmp_path / "a.txt"
    atomic_write(target, lambda p: open(p, "w").write("one"))
    try:
        atomic_write(target, lambda p: open(p, "w").write("two"))
    except InputError as exc:
        assert "a.txt" in str(exc)
    else:
        raise AssertionError("overwrote without permission")
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_failure_leaves_nothing(tmp_path):
    from iddm_core.atomic import atomic_write

    def broken(p):
        open(p, "w").write("partial")
        raise RuntimeError("boom")

    try:
        atomic_write(tmp_path / "b.bin", broken)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_image_folder_errors_name_the_file(tmp_path):
    from iddm_core.errors import InputError
    from iddm_core.images import load_folder

    try:
        load_folder(tmp_path)
    except InputError as exc:
        assert str(tmp_path) in str(exc)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    try:
        load_folder(tmp_path)
    except InputError as exc:
        assert "broken.jpg" in str(exc)
    else:
        raise AssertionError("unreadable image accepted")


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os
    import stat

    from iddm_core.atomic import atomic_write

    umask = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "lora.safetensors", lambda p: open(p, "wb").write(b"x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644   # readable by the app's other users, like any output
