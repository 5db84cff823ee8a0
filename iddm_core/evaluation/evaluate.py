"""The identity-leak evaluation: :func:`evaluate` scores a batch of (generated or protected) images against the
user's clean photos — does the face still look like the user to a face recogniser?

It strings together the pieces of this package: who judges and by which rule (evaluation/judges.py: recognisers
held out from the attack, dlib by its own distance rule), the faces of the images (evaluation/faces.py), the
metrics (evaluation/metrics.py: FSR, ISM, match rate, retrieval, PSNR/SSIM) and BRISQUE (evaluation/brisque.py);
docs/evaluation.md defines each number. Nothing here writes files or logs photo names: the result is a JSON-ready
dict without file names or paths.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from ..errors import InputError
from .brisque import BrisqueScorer
from .faces import (FaceScan, descriptors, embed, gallery_layout, gallery_prototype, sample_detector_name, scan_faces,
                    uint8_images)
from .judges import (AUTO, choose_judges, held_out_warnings, load_eval_recognizers, match_rule, match_threshold,
                     recognizer_name)
from .metrics import (cosine_to, face_success_rate, fidelity_report, identity_score, mean_finite, prototype,
                      retrieval_ranks, top_k_rate)


# 14 parameters: the keyword API that `iddm evaluate`, `bench paper` and the Identity Leak Meter node call (each an
# independent option with a default; cli/evaluate.py and nodes/leak_meter.py pass them by name).
def evaluate(images: torch.Tensor, refs, eval_recognizers=AUTO, surrogates: Sequence = (),
             detector=None, gallery=None, top_k: Sequence[int] = (1, 5), protected: torch.Tensor | None = None,
             original: torch.Tensor | None = None, quality: bool = True, device=None, labels: Sequence[str] = (),
             callback=None, search_dirs: Sequence[str] | None = None) -> dict:
    """Score a batch of images ``[N, 3, H, W]`` in [0, 1] against the user's clean photos ``refs``.

    ``eval_recognizers``: ``"auto"`` (default: every installed recogniser that is not a surrogate, see
    :func:`~.judges.choose_judges`), or names ("dlib", "arcface:PATH.onnx", ...) / Recognizer modules;
    ``surrogates``: the recognisers the protection was optimised against (names), used to pick held-out judges and
    to warn. ``gallery``: a folder of distractor identities (see :func:`~.faces.gallery_layout`); the user
    (prototype of ``refs``) is added as identity ``"user"`` and retrieval reports how often a generated face ranks
    the user first. ``protected``/``original``: X' and X0 for PSNR/SSIM. ``labels``: per-image labels (e.g. prompt
    index) copied into the result. ``search_dirs``: model folders for "auto" (default ``$IDDM_MODEL_DIRS``).
    ``detector``: finds the faces of ``images`` and of the gallery photos; default: dlib's HOG for the photos and
    :func:`~.faces.sample_detector_name` of the images' size for the images. Returns a JSON-ready dict (no file
    names or paths in it).
    """
    from ..events import Emitter
    from ..face.detect import get_detector

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise InputError(f"images: expected a non-empty [N, 3, H, W] batch, got {tuple(images.shape)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    judges = choose_judges(eval_recognizers, surrogates, search_dirs)
    surrogate_names = [recognizer_name(s) for s in surrogates]
    messages = [judges.warning] if judges.warning else held_out_warnings(judges.names, surrogate_names)
    for m in messages:
        warnings.warn(m, UserWarning, stacklevel=2)
    sample_detector = detector or get_detector(sample_detector_name(images.shape[-1]))
    detector = detector or get_detector("dlib")
    recognizers = load_eval_recognizers(judges.tokens, device)
    emit = Emitter(callback, total=len(recognizers) + 2)

    scan = scan_faces(images, sample_detector)
    emit("eval", message="faces detected")
    clean = _reference_batch(refs)
    layout = gallery_layout(gallery) if gallery is not None else None
    result = {"n_images": int(images.shape[0]), "faces_found": scan.found, "fsr": face_success_rate(scan.found),
              "eval_recognizers": judges.names, "surrogates": surrogate_names, "held_out": judges.held_out,
              "judges": judges.note, "recognizers": {}, "warnings": messages}
    if labels:
        result["labels"] = list(labels)
    for rec in recognizers:
        entry, proto, emb = judge(rec, images, scan, clean)
        if layout is not None:
            entry["retrieval"] = _retrieval(rec, proto, emb, layout, detector, top_k)
        result["recognizers"][rec.name] = entry
        emit("eval", similarity={rec.name: entry["ism"]} if entry["ism"] is not None else {})
    if quality:
        result.update(brisque_scores(images))
    if protected is not None and original is not None:
        result["fidelity"] = fidelity_report(protected.cpu(), original.cpu())
    emit("eval", message="done")
    return result


def judge(rec, images: torch.Tensor, scan: FaceScan, clean: tuple[torch.Tensor, torch.Tensor]):
    """One recogniser's verdict on the faces of ``images``: (report entry, the user's prototype, the embeddings of
    the found faces). ``similarity`` (cosine to the prototype, None where no face) and ISM for every judge; the
    match decision by the judge's :func:`~.judges.match_rule`, whose scores (``distance`` for dlib) are listed
    too."""
    proto = prototype(embed(rec, *clean))
    emb = embed(rec, images[scan.index], scan.landmarks)
    sims = _per_image(scan, cosine_to(emb, proto).tolist() if emb.numel() else [])
    rule = match_rule(rec.name)
    scores = sims if rule.score == "cosine" else distances(rec, images, scan, clean)
    entry = {"ism": identity_score(sims), "similarity": sims, "threshold": match_threshold(rec.name),
             "match": rule.to_dict(), "match_rate": rule.rate(scores), "matched": [rule.accepts(s) for s in scores]}
    if rule.score == "distance":
        entry["distance"] = scores
    return entry, proto, emb


def distances(rec, images: torch.Tensor, scan: FaceScan, clean: tuple[torch.Tensor, torch.Tensor]) -> list:
    """Per image, the Euclidean distance of its face's raw descriptor to the mean raw descriptor of the clean
    photos (dlib's own comparison, as face.attack.dlib_distance makes it); None where no face was found."""
    centre = descriptors(rec, *clean).mean(0)
    found = descriptors(rec, images[scan.index], scan.landmarks)
    return _per_image(scan, (found - centre).norm(dim=1).tolist() if found.numel() else [])


def brisque_scores(images: torch.Tensor) -> dict:
    """BRISQUE of every image and their mean."""
    scorer = BrisqueScorer()
    scores = [scorer(rgb) for rgb in uint8_images(images)]
    return {"brisque": mean_finite(scores), "brisque_per_image": scores}


def _per_image(scan: FaceScan, values: list) -> list[Optional[float]]:
    """The values of the found faces spread over all images (None where no face was found)."""
    out: list[Optional[float]] = [None] * len(scan.found)
    for i, v in zip(scan.index, values):
        out[i] = float(v)
    return out


def _reference_batch(refs) -> tuple[torch.Tensor, torch.Tensor]:
    """All clean photos of a PrivateRefs (Xc and X0: both are the user's clean identity), or an (images,
    landmarks) pair."""
    if hasattr(refs, "images") and hasattr(refs, "landmarks"):
        return refs.images, refs.landmarks
    images, landmarks = refs
    return images, landmarks


def _retrieval(rec, user_proto: torch.Tensor, probes: torch.Tensor, layout: dict, detector, top_k) -> dict:
    names, protos = ["user"], [user_proto]
    for identity, files in layout.items():
        proto = gallery_prototype(rec, files, detector)
        if proto is not None:
            names.append(identity)
            protos.append(proto)
    ranks = retrieval_ranks(probes, torch.stack(protos), 0) if probes.numel() else []
    out = {"identities": len(names), "mean_rank": mean_finite(ranks)}
    out.update({f"top{k}": top_k_rate(ranks, k) for k in top_k})
    return out
