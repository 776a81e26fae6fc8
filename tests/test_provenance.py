"""Recognising an upload that is one of the model's own training inputs (core.provenance)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core import io as mio
from core import provenance as P
from core.checkpoint import read_card


def test_fingerprint_is_of_values_and_shape_not_of_dtype():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert P.fingerprint(a) == P.fingerprint(a.astype(np.float32)) == P.fingerprint(np.asfortranarray(a))
    assert P.fingerprint(a) != P.fingerprint(a.reshape(4, 3))  # same bytes, another image
    b = a.copy()
    b[0, 0] = 1
    assert P.fingerprint(a) != P.fingerprint(b)
    assert len(P.fingerprint(a)) == P.DIGITS


def test_lookup_only_for_the_weights_it_was_written_for(tmp_path):
    a = np.ones((4, 4, 2), np.float32)
    (tmp_path / "atrium.training-fingerprints.json").write_text(json.dumps(
        {"weights_sha256": "abc", "digits": P.DIGITS, "cases": {P.fingerprint(a): "la_003"}}))
    fps = P.load_fingerprints("atrium", {"weights_sha256": "abc"}, tmp_path)
    assert P.training_case(fps, a) == "la_003" and P.training_case(fps, a * 2) is None
    assert P.load_fingerprints("atrium", {"weights_sha256": "other"}, tmp_path) is None  # other weights: say nothing
    assert P.load_fingerprints("cardiac", {"weights_sha256": "abc"}, tmp_path) is None  # no file
    assert P.training_case(None, a) is None


@pytest.mark.parametrize("task", ["pneumonia", "cardiac", "atrium"])
def test_committed_fingerprints_belong_to_the_committed_weights(task):
    card = read_card(task)
    fps = P.load_fingerprints(task, card)
    assert fps, f"weights/{task}.training-fingerprints.json is missing or stale: run python -m core.provenance --task {task}"
    assert len(fps) >= 0.99 * len(card["data"]["train_cases"])  # a few training images are exact duplicates


def test_training_inputs_are_recognised_and_validation_ones_are_not(xray_root, acdc_root, heart_root):
    """Read as an upload is read: a training radiograph, ED frame and atrium volume are found; validation
    ones are not."""
    pn = read_card("pneumonia")
    fps = P.load_fingerprints("pneumonia", pn)
    for rel, want in ((pn["data"]["train_cases"][0], True), (pn["data"]["val_cases"][0], False)):
        path = xray_root / rel
        got = P.training_case(fps, mio.read_image_2d(path.read_bytes(), path.name).pixels)
        assert (got == rel) if want else got is None
    cd = read_card("cardiac")
    fps = P.load_fingerprints("cardiac", cd)
    cases = {c.patient_id: c for c in mio.find_cardiac_cases(acdc_root)}
    tr, va = cases[cd["data"]["train_cases"][0]], cases[cd["data"]["val_cases"][0]]
    assert P.training_case(fps, mio.read_image_volume(tr.ed_path.read_bytes()).data) == f"{tr.patient_id} ED frame"
    assert P.training_case(fps, mio.read_image_volume(va.es_path.read_bytes()).data) is None
    at = read_card("atrium")
    c = mio.find_atrium_cases(heart_root)[0]
    got = P.training_case(P.load_fingerprints("atrium", at), mio.read_image_volume(c.image_path.read_bytes()).data)
    assert got == (c.case_id if c.case_id in at["data"]["train_cases"] else None)
