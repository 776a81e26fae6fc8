"""Property-based fuzzing of every reader with inputs made by mutating real files.

Each reader must end in a valid result or the project's InvalidInputError: never another exception,
a hang (hypothesis deadline) or a memory blow-up (peak RSS bound).
"""
from __future__ import annotations

import gzip
import resource

import numpy as np
import pytest
from conftest import dicom_bytes, nifti_bytes, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import io as mio
from core.errors import InvalidInputError

N_EXAMPLES = 1000
FUZZ = settings(max_examples=N_EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


@st.composite
def mutated(draw, seed: bytes, header: int = 400) -> bytes:
    """Apply 1-4 random mutations (bit flips, header overwrites, truncation, insertion, duplication)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "header", "truncate", "insert", "duplicate", "zero_run"]))
        n = len(data)
        if n == 0:
            break
        if op == "flip":
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "header":
            i = draw(st.integers(0, min(header, n) - 1))
            data[i : i + 4] = draw(st.binary(min_size=1, max_size=4))
        elif op == "truncate":
            data = data[: draw(st.integers(0, n - 1))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "duplicate":
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i : i + draw(st.integers(1, 256))]
        else:
            i = draw(st.integers(0, n - 1))
            data[i : i + draw(st.integers(1, 512))] = b"\0" * 16
    return bytes(data)


def _check(reader, data: bytes, name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        reader(data)
    except InvalidInputError as exc:
        assert str(exc)  # a message for the user
    # any other exception propagates and fails the test


@pytest.fixture(scope="module")
def seeds(xray_root, heart_root):
    """Small seed files built in memory from real shared data (nothing is written to disk)."""
    from PIL import Image

    jpeg = (xray_root / "chest_xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg").read_bytes()
    im = np.asarray(Image.open((xray_root / "chest_xray" / "train" / "NORMAL" / "IM-0117-0001.jpeg")).convert("L"))
    small = np.asarray(Image.fromarray(im).resize((96, 96)))
    case = mio.find_atrium_cases(heart_root)[0]
    vol = mio.load_nifti_path(case.image_path)
    lab = mio.load_nifti_path(case.label_path).data.astype(np.uint8)
    z = int(np.argwhere(lab)[:, 2].mean())
    crop = np.ascontiguousarray(vol.data[96:160, 96:160, z - 4 : z + 4].astype(np.uint8))
    lcrop = np.ascontiguousarray(lab[96:160, 96:160, z - 4 : z + 4])
    nii = nifti_bytes(crop, vol.affine, gz=False)
    return {
        "jpeg": jpeg,
        "png": png_bytes(small),
        "dicom": dicom_bytes(small.astype(np.uint16) * 16, slope=1.0, intercept=-1024.0, window=(1000, 3000)),
        "nii": nii,
        "nii_gz": gzip.compress(nii),
        "mask": nifti_bytes(lcrop, vol.affine, gz=False),
        "image_volume": mio.read_image_volume(nii),
    }


@pytest.mark.parametrize("fmt", ["jpeg", "png", "dicom"])
def test_fuzz_2d_readers(seeds, fmt):
    mio.read_image_2d(seeds[fmt])  # the seed itself is valid

    @FUZZ
    @given(data=mutated(seeds[fmt]))
    def run(data):
        _check(lambda d: mio.read_image_2d(d, f"x.{fmt}"), data, fmt)

    run()
    assert COUNTS[fmt] >= N_EXAMPLES


@pytest.mark.parametrize("fmt", ["nii", "nii_gz"])
def test_fuzz_nifti_reader(seeds, fmt):
    mio.read_image_volume(seeds[fmt])

    @FUZZ
    @given(data=mutated(seeds[fmt]))
    def run(data):
        _check(mio.read_image_volume, data, fmt)

    run()
    assert COUNTS[fmt] >= N_EXAMPLES


def test_fuzz_mask_reader(seeds):
    image = seeds["image_volume"]
    mio.read_mask(seeds["mask"], image)

    @FUZZ
    @given(data=mutated(seeds["mask"]))
    def run(data):
        _check(lambda d: mio.read_mask(d, image), data, "mask")

    run()
    assert COUNTS["mask"] >= N_EXAMPLES


def test_fuzz_memory_stayed_bounded():
    if not COUNTS:
        pytest.skip("fuzz tests did not run")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < 4000, f"peak RSS {peak_mb:.0f} MB"
    print(f"fuzzed inputs per reader: {COUNTS}; peak RSS {peak_mb:.0f} MB")
