"""The values that travel on the IDDM node links, and the names of their socket types.

They are deliberately light: a link carries a description of what to load (folder + split parameters, recogniser
names + tau, PGD numbers), and the heavy objects (face models, Stable Diffusion) are built by the node that
runs, once per run. That keeps ComfyUI's output cache small and lets one IDDM_LOSS feed several trainings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

REFS = "IDDM_REFS"
LOSS = "IDDM_LOSS"
PGD = "IDDM_PGD"
CATEGORY = "IDDM"


class ComboName(str):
    """An output socket type that ComfyUI accepts on a combo input (e.g. LoraLoader's lora_name).

    ComfyUI validates a link by ``received_type != input_type``; a combo input's type is the list of choices,
    which a plain string never equals. This string compares equal to any list (a combo) and to "COMBO"/"STRING",
    and to nothing else, so the trained LoRA's file name can be wired straight into the stock LoraLoader.
    The frontend sees the plain text "COMBO", which it links to combo inputs. On the V3 schema the object itself
    must stay the output's type (nodes/v3.py ``_combo_name_output``: ``io.Custom`` may re-wrap it).
    """

    def __new__(cls, text: str = "COMBO"):
        return super().__new__(cls, text)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple)):
            return True
        return str.__eq__(self, other) or other in ("COMBO", "STRING")

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


@dataclass
class RefsHandle:
    """IDDM_REFS: where the photos are and how to split them, plus prepared crops cached per resolution.

    The training node may need another resolution than the preview (0 = the model's native size); it asks
    :meth:`at` and the photos are re-prepared with the same detector and the same split parameters.
    ``PrivateRefs.names`` stay inside this object: they are never shown, logged or written, and its repr names
    neither the folder nor any file.
    """

    folder: str
    seed: int = 0
    n_reference: Optional[int] = None
    reference_files: Optional[list] = None
    protect_files: Optional[list] = None
    skip_faceless: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        # ComfyUI keeps an execution error's inputs (their repr) in /history and shows them: no folder or file name
        return (f"RefsHandle(<private photo folder>, seed={self.seed}, n_reference={self.n_reference}, "
                f"listed_files={bool(self.reference_files or self.protect_files)})")

    __str__ = __repr__

    def at(self, resolution: int):
        """PrivateRefs at ``resolution`` (computed once per resolution)."""
        if resolution not in self._cache:
            self._cache[resolution] = self._load(resolution)
        return self._cache[resolution]

    def _load(self, resolution: int):
        """The library names the folder, every faceless photo (an error when ``skip_faceless`` is off) and the
        "need at least 3 photos" case itself."""
        from ..iddm_core.protection.refs import load_private_refs

        return load_private_refs(self.folder, resolution, seed=self.seed, n_reference=self.n_reference,
                                 reference_files=self.reference_files, protect_files=self.protect_files,
                                 skip_faceless=self.skip_faceless)


@dataclass(frozen=True)
class LossSpec:
    """IDDM_LOSS: the surrogate recognisers (registry tokens ``name`` or ``name:PATH``) and the softmax tau."""

    surrogates: tuple
    tau: float = 0.03

    @property
    def names(self) -> list[str]:
        return [s.split(":", 1)[0] for s in self.surrogates]

    def build(self, device):
        """The FaceEnsembleLoss on ``device`` (recognisers loaded now, frozen)."""
        from ..iddm_core.protection.iddm import build_ensemble

        return build_ensemble(self.surrogates, self.tau, device)


def tooltip_check(spec: dict) -> list[str]:
    """Names of inputs in an INPUT_TYPES dict without a tooltip (used by tests and at import in debug)."""
    missing = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            opts = entry[1] if len(entry) > 1 else {}
            if not opts.get("tooltip"):
                missing.append(name)
    return missing
