"""The shape of iddm_core that issue 25 set (docs/DESIGN.md): no import circles, no module much over 500 lines,
and the ComfyUI/A1111 adapters stay outside the library."""
import importlib.util
import re

from conftest import ROOT

MAX_LINES = 500


def _tool():
    spec = importlib.util.spec_from_file_location("import_circles", ROOT / "tools" / "import_circles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles():
    tool = _tool()
    graph = tool.import_graph(ROOT / "iddm_core")
    assert len(graph) > 50 and tool.circles(graph) == []


def test_the_circle_finder_finds_a_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from .a import y\n")
    tool = _tool()
    assert tool.circles(tool.import_graph(package)) == [["pkg.a", "pkg.b"]]
    assert tool.circles(tool.import_graph(package, top_level_only=True)) == []


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "iddm_core").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_library_imports_no_host():
    host = re.compile(r"^\s*(from|import)\s+(comfy|folder_paths|server|nodes|modules|gradio)\b", re.M)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "iddm_core").rglob("*.py") if host.search(p.read_text())]
    assert hits == []


def test_only_the_commands_import_the_command_line():
    """cli/ and bench/ are command layers over the library; the rest (batch included: a job's options are defined
    in protection/options.py) never imports them."""
    cli = re.compile(r"^\s*from\s+(\.\.?cli\b|iddm_core\.cli\b)|^\s*import\s+iddm_core\.cli\b", re.M)
    lib = ROOT / "iddm_core"
    commands = (lib / "cli", lib / "bench")
    hits = [str(p.relative_to(ROOT)) for p in lib.rglob("*.py")
            if not any(c in p.parents for c in commands) and p.name != "__main__.py" and cli.search(p.read_text())]
    assert hits == []
