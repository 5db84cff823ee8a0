import subprocess
import sys
from pathlib import Path

from conftest import HANG_S, ROOT


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


# ------------------------------------------------------------------------------ the `iddm` command (issue 12)
def _project():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _run_from(cwd, args, extra_path=True):
    import os

    env = dict(os.environ)
    if extra_path:   # where `pip install -e .` has not been run: the repo on the path, but not the working dir
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S)


def test_declared_entry_point_works_from_another_directory(tmp_path):
    # pyproject's [project.scripts] iddm = "module:function", called the way pip's console script calls it
    module, func = _project()["project"]["scripts"]["iddm"].split(":")
    code = f"import sys; from {module} import {func} as entry; sys.argv[0] = 'iddm'; sys.exit(entry(sys.argv[1:]))"
    out = _run_from(tmp_path, [sys.executable, "-c", code, "--help"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: iddm ") and "face-models" in out.stdout and "train" in out.stdout
    out = _run_from(tmp_path, [sys.executable, "-c", code, "face-models"])
    assert out.returncode == 0, out.stderr
    assert "faceres" in out.stdout and "packaged (iddm_core/assets/recognizers)" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_installed_iddm_command_runs_anywhere(tmp_path):
    """Runs where `pip install -e .` was done (.ci/run does it); skipped otherwise."""
    import pytest

    script = Path(sys.executable).parent / "iddm"
    if not script.exists():
        pytest.skip("the iddm command is not installed here (pip install -e .)")
    out = _run_from(tmp_path, [str(script), "--help"], extra_path=False)
    assert out.returncode == 0 and out.stdout.startswith("usage: iddm "), out.stderr
    out = _run_from(tmp_path, [str(script), "face-models"], extra_path=False)
    assert out.returncode == 0 and "faceres" in out.stdout, out.stderr
    where = _run_from(tmp_path, [sys.executable, "-c", "import iddm_core; print(iddm_core.__file__)"], extra_path=False)
    assert Path(where.stdout.strip()).resolve() == (ROOT / "iddm_core" / "__init__.py").resolve(), where.stderr


def test_package_installs_only_the_library_with_all_its_data_files():
    from fnmatch import fnmatchcase

    project = _project()
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    setuptools = project["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["iddm_core", "iddm_core.*"]
    patterns = setuptools["package-data"]["iddm_core"]
    package = ROOT / "iddm_core"
    data = [p.relative_to(package).parts for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(parts[:2] == ("assets", "demo_model") for parts in data)
    uncovered = ["/".join(parts) for parts in data
                 if not any(len(pat.split("/")) == len(parts) and all(map(fnmatchcase, parts, pat.split("/")))
                            for pat in patterns)]
    assert uncovered == []    # the demo model, sample faces, recogniser and configs ship with an installed copy


def test_cli_kind_choices_are_the_model_kinds():
    from iddm_core.cli._common import KIND_CHOICES
    from iddm_core.diffusion.kinds import KINDS

    assert tuple(KIND_CHOICES) == tuple(KINDS)
