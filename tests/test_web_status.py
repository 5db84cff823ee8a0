"""web/iddm.js's status text, run in Node.js against stand-ins of ComfyUI's app/api modules (issue 24 item 4):
every node that returns text in its ``ui`` has it drawn, inside room the node reserves from the start, so a long
summary never makes a node grow over the node below it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import HANG_S, ROOT

DRIVER = r"""
await import(process.argv[2]);                 // registers the extension through the app stand-in
const e = globalThis.__iddm_ext;
const out = {};
for (const name of JSON.parse(process.argv[3])) {
  const proto = { computeSize() { return [300, 200]; } };
  await e.beforeRegisterNodeDef({ prototype: proto }, { name });
  const node = Object.create(proto);
  Object.assign(node, { type: name, comfyClass: name, flags: {},
    setSize(s) { this.size = [...s]; }, setDirtyCanvas() {} });
  node.size = node.computeSize();
  const created = [...node.size];
  const long = Array.from({ length: 40 }, (_, i) => `line ${i} ` + "word ".repeat(30)).join("\n");
  node.onExecuted?.({ text: [long] });
  const afterRun = [...node.size];
  const drawn = [];
  const ctx = { save() {}, restore() {}, fillRect() {}, beginPath() {}, moveTo() {}, lineTo() {}, stroke() {},
    strokeRect() {}, fillText(t, x, y) { drawn.push([t, y]); }, measureText(t) { return { width: t.length * 6 }; } };
  node.onDrawForeground?.(ctx);
  node.size = [320, 50];                       // a workflow saved with a smaller node, loaded
  node.onConfigure?.({});
  out[name] = { created, afterRun, drawn, hasStatus: !!node.onExecuted, configured: [...node.size] };
}
console.log(JSON.stringify(out));
"""


def _ui_text_nodes() -> set[str]:
    """Node ids whose Python returns text in ``ui`` (found in the source, so a new one is not forgotten)."""
    classes = {}
    for f in (ROOT / "nodes").glob("*.py"):
        text = f.read_text(encoding="utf-8")
        if '"ui": {"text"' in text or "ui = {\"text\"" in text:
            classes[f.stem] = text
    ids = set()
    for stem, text in classes.items():
        for match in re.finditer(r'"(IDDM\w+)":\s*\w+', text):
            ids.add(match.group(1))
    mapping = (ROOT / "nodes" / "__init__.py").read_text(encoding="utf-8")
    for stem in classes:
        module_classes = re.findall(r"^class (\w+)", classes[stem], flags=re.M)
        for cls in module_classes:
            for match in re.finditer(rf'"(IDDM\w+)":\s*{cls}\b', mapping):
                ids.add(match.group(1))
    return ids


@pytest.fixture(scope="module")
def node_exe():
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("Node.js is not installed")
    return exe


def test_every_node_with_ui_text_draws_it_in_reserved_room(tmp_path, node_exe):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { registerExtension(e) { globalThis.__iddm_ext = e; } };\n")
    (tmp_path / "scripts" / "api.js").write_text("export const api = { addEventListener() {} };\n")
    ext = tmp_path / "extensions" / "iddm"
    ext.mkdir(parents=True)
    shutil.copy(ROOT / "web" / "iddm.js", ext / "iddm.js")
    (tmp_path / "driver.mjs").write_text(DRIVER)
    names = sorted(_ui_text_nodes())
    assert {"IDDMLoadPrivateRefs", "IDDMTrainLoRA", "IDDMProtectPhotos", "IDDMIdentityLeakMeter"} <= set(names)
    run = subprocess.run([node_exe, str(tmp_path / "driver.mjs"), (ext / "iddm.js").as_uri(), json.dumps(names)],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for name in names:
        r = result[name]
        assert r["hasStatus"], f"{name} returns ui text that web/iddm.js never draws"
        assert r["created"][1] > 200, f"{name} reserves no room for its text"
        assert r["afterRun"] == r["created"], f"{name} grew when its text arrived"
        drawn = [t for t, y in r["drawn"] if t.startswith("line ") or t.startswith("  word") or t.startswith("...")]
        assert drawn, f"{name}: no status line drawn"
        assert all(0 < y <= r["created"][1] for _, y in r["drawn"]), f"{name}: text drawn outside the node"
        assert any(t.startswith("...") for t in drawn)          # the 40-line text was cut, not overflowing
        assert r["configured"][1] == r["created"][1]            # a too-small saved node is made tall enough


def test_shipped_workflows_leave_room_between_stacked_nodes():
    """In the shipped UI workflows no node's box (position + size) overlaps another's."""
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        nodes = json.loads(path.read_text())["nodes"]
        boxes = [(n["id"], *n["pos"], *n["size"]) for n in nodes]
        for i, (a, ax, ay, aw, ah) in enumerate(boxes):
            for b, bx, by, bw, bh in boxes[i + 1:]:
                overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
                assert not overlap, f"{path.name}: nodes {a} and {b} overlap"
