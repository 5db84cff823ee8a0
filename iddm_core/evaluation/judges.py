"""Who judges an evaluation and by which rule: held-out recognisers, match thresholds and match rules.

The evaluation recogniser must be *held out*: scoring with a recogniser the perturbation was optimised against
measures the attack, not the leak. :func:`choose_judges` picks held-out judges by default and says loudly when
there are none; :func:`held_out_warnings` flags judges named explicitly that were surrogates.

A judge decides "this face is still the user" by its :class:`MatchRule`: the cosine of its normalised embedding
to the user's prototype at or above a calibrated threshold, or for dlib its own rule, the Euclidean distance of
its raw 128-D descriptor to the mean of the user's raw descriptors at or below 0.6 (docs/evaluation.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..face.attack import DLIB_MATCH_THRESHOLD
from ..face.ensemble import CALIBRATION, UNCALIBRATED

# ------------------------------------------------------------------------------------------- match rules

# Cosine similarity at or above which a recogniser "still recognises the user": each recogniser's 1 %-false-accept
# point on the congress corpus (1,251 photos with a face, 1,115 people: 136 same-person pairs, 781,739 different;
# `python -m iddm_core.bench verify --faces ../shared/faces/congress`, docs/evaluation.md). At these points dlib
# accepts 100 % of the same-person pairs, faceres 98 %, mobileface 94 %, faceres-deep 73 % (`--recognizers
# faceres-deep --models-dir DIR`, its files in DIR/facerecognition/human). dlib's own rule, Euclidean distance of its
# raw descriptors <= 0.6, sits at the same place (its 1 %-false-accept distance there is 0.610), and it is the rule
# dlib's matches are decided by (MATCH_RULES); dlib's cosine threshold stays the level its similarity bars are drawn
# against. ArcFace-family models (arcface, glintr100, irse50, ir152, mobileface_zoo, facenet) are not installable
# here and keep the common 0.4. The numbers are stated once, in face/ensemble.py's CALIBRATION (whose same/different
# means the fair ensemble also uses).
MATCH_THRESHOLDS = {name: cal.threshold for name, cal in CALIBRATION.items()}
DEFAULT_MATCH_THRESHOLD = UNCALIBRATED.threshold


def match_threshold(name: str) -> float:
    """The recogniser's calibrated cosine threshold (the level its similarity bars are drawn against)."""
    return MATCH_THRESHOLDS.get(name, DEFAULT_MATCH_THRESHOLD)


@dataclass(frozen=True)
class MatchRule:
    """How a judge decides that a face is the user: ``score`` "cosine" (the normalised embedding's cosine to the
    user's prototype, a match at or above ``threshold``) or "distance" (the Euclidean distance of the raw
    descriptor to the mean of the user's raw descriptors, a match at or below ``threshold``)."""

    score: str
    threshold: float

    def accepts(self, value: Optional[float]) -> Optional[bool]:
        """Match or not for one face's score; None for an image without a face (None)."""
        if value is None:
            return None
        return value >= self.threshold if self.score == "cosine" else value <= self.threshold

    def rate(self, values: Sequence[Optional[float]]) -> Optional[float]:
        """Share of the detected faces that match (None when no image has a face)."""
        verdicts = [v for v in map(self.accepts, values) if v is not None]
        return float(sum(verdicts)) / len(verdicts) if verdicts else None

    def to_dict(self) -> dict:
        return {"score": self.score, "threshold": self.threshold}


# dlib by its own documented rule (distance <= 0.6), not by the cosine stand-in; the others by their cosine.
MATCH_RULES = {"dlib": MatchRule("distance", DLIB_MATCH_THRESHOLD)}


def match_rule(name: str) -> MatchRule:
    """The rule that decides a match for the recogniser ``name``."""
    return MATCH_RULES.get(name) or MatchRule("cosine", match_threshold(name))


def match_rate(similarities: Sequence[Optional[float]], threshold: float) -> Optional[float]:
    """Share of detected faces whose cosine is at or above ``threshold`` (None if no face at all)."""
    return MatchRule("cosine", threshold).rate(similarities)


# ----------------------------------------------------------------------------------------------------- judges


def recognizer_name(spec) -> str:
    """Registry name of a recogniser given as a Recognizer object, a RecognizerSpec or a 'name[:path]' string."""
    from ..face.registry import canonical_name

    if isinstance(spec, torch.nn.Module):
        return str(getattr(spec, "name", type(spec).__name__))
    if hasattr(spec, "name") and not isinstance(spec, str):
        return spec.name
    return canonical_name(str(spec).partition(":")[0])


def held_out_warnings(eval_names: Sequence[str], surrogate_names: Sequence[str]) -> list[str]:
    """One message per evaluation recogniser that was also a surrogate (its scores are not a fair leak test)."""
    overlap = [n for n in eval_names if n in set(surrogate_names)]
    return [f"evaluation recogniser {n!r} was also an attack surrogate: its similarity measures the attack, not "
            f"the identity leak; evaluate with a held-out recogniser" for n in overlap]


AUTO = "auto"      # eval_recognizers value: every installed recogniser that was not a surrogate of the run


@dataclass
class Judges:
    """Which recognisers judge a run. ``tokens``: registry tokens ("name" or "name:PATH") or ready modules;
    ``held_out``: no judge was a surrogate (False also when the surrogates are unknown); ``note``: one line naming
    the judges for a report or the console (names only, never paths); ``warning``: set when "auto" found no
    held-out recogniser and fell back to the surrogates."""

    tokens: list
    names: list[str]
    held_out: bool
    note: str
    warning: Optional[str] = None


def _token(spec) -> str:
    return spec.name if spec.path is None else f"{spec.name}:{spec.path}"


def choose_judges(requested=AUTO, surrogates: Sequence = (), search_dirs: Sequence[str] | None = None) -> Judges:
    """The evaluation recognisers of a run.

    ``requested`` = ``"auto"`` (or None/empty): every *installed* recogniser (``face.registry.discover``) that is
    not among ``surrogates`` nor a relative of one (``face.registry.FAMILIES``), so the judge is held out from the
    attack by default. When none is installed besides
    the surrogates, the surrogates judge (dlib is always installed) and the note says loudly that the scores then
    measure the attack, not the leak. Anything else (names, "name:PATH" strings, specs or modules, or a comma
    separated string of tokens) is used as given.
    """
    from ..face.registry import discover, family

    surrogate_names = [recognizer_name(s) for s in surrogates]
    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", AUTO)):
        installed = [s for s in discover(None if search_dirs is None else list(search_dirs)) if s.available]
        held = [s for s in installed if family(s.name) not in {family(n) for n in surrogate_names}]
        if not surrogate_names:
            names = [s.name for s in installed]
            return Judges([_token(s) for s in installed], names, False,
                          f"judged by every installed recogniser ({', '.join(names)}); the run's surrogates were "
                          "not given, so whether they are held out is unknown")
        if held:
            names = [s.name for s in held]
            return Judges([_token(s) for s in held], names, True,
                          f"judged by held-out recognisers: {', '.join(names)} (surrogates of the run: "
                          f"{', '.join(surrogate_names)})")
        fallback = [s for s in installed if s.name in surrogate_names] or [s for s in installed if s.name == "dlib"]
        names = [s.name for s in fallback]
        message = (f"no held-out recogniser is installed: judged by {', '.join(names)}, which the protection was "
                   "optimised against, so the scores measure the attack, not the identity leak; install another "
                   "recogniser (e.g. faceres, see `python -m iddm_core face-models`)")
        return Judges([_token(s) for s in fallback], names, False, message, warning=message)
    items = [t.strip() for t in requested.split(",") if t.strip()] if isinstance(requested, str) else list(requested)
    names = [recognizer_name(r) for r in items]
    overlap = [n for n in names if family(n) in {family(s) for s in surrogate_names}]
    held_out = bool(surrogate_names) and not overlap
    note = (f"judged by {', '.join(names)}" + (" (held out from the surrogates)" if held_out else "")
            + ("" if surrogate_names else "; the run's surrogates were not given"))
    return Judges(items, names, held_out, note)


def load_eval_recognizers(items, device) -> list:
    """Recogniser modules from names / 'name:path' strings / specs / ready modules (modules are kept as given)."""
    from ..face.registry import RecognizerSpec, load_recognizer, parse_surrogates

    out = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            out.append(item.to(device).eval())
        elif isinstance(item, RecognizerSpec):
            out.append(load_recognizer(item, device))
        else:
            out.extend(load_recognizer(s, device) for s in parse_surrogates(str(item)))
    return out
