"""Distribution metadata (issue 24): semantic version kept in step with the changelog, the Comfy Registry fields,
and a .comfyignore that leaves out development files but nothing a host reads at run time."""
from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

from conftest import ROOT

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_is_semantic_and_the_changelog_starts_with_it():
    version = _pyproject()["project"]["version"]
    assert SEMVER.match(version), version
    headings = re.findall(r"^## (\S+) — (\d{4}-\d{2}-\d{2})$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"),
                          flags=re.M)
    assert headings and headings[0][0] == version, headings[:1]
    versions = [tuple(int(x) for x in v.split(".")) for v, _ in headings]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)


def test_comfy_registry_fields():
    data = _pyproject()
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert re.match(r"^>=\d+\.\d+\.\d+$", comfy["requires-comfyui"])
    project = data["project"]
    assert project["description"] and project["license"] and project["requires-python"]
    deps = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert not deps & {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu"}   # the host's or install.py's call


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.gitignore-style matching for the simple patterns .comfyignore uses (anchored /x/, /x, *.ext, name/)."""
    parts = rel.split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        body = pattern.strip("/")
        if anchored:
            if fnmatch.fnmatch(rel, body) or any(fnmatch.fnmatch("/".join(parts[:i]), body)
                                                 for i in range(1, len(parts))):
                return True
        elif any(fnmatch.fnmatch(part, body) for part in parts):
            return True
    return False


def test_comfyignore_keeps_what_hosts_read_and_drops_development_files():
    patterns = [line.strip() for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    runtime = [f for f in tracked if f.split("/")[0] in ("iddm_core", "nodes", "web", "scripts", "example_workflows")
               or f in ("__init__.py", "install.py", "requirements.txt", "pyproject.toml", "README.md", "LICENSE")]
    assert runtime and not [f for f in runtime if _ignored(f, patterns)]
    for dev in ("tests/test_distribution.py", ".ci/run", "requirements-dev.txt", "docs/a1111_tab.png"):
        assert _ignored(dev, patterns), dev
