"""The sample head CT (Debian package invesalius-examples): fetching, integrity and orientation.

These tests use the real package (apt-get download; the CI machine runs as root with apt access).
Nothing is skipped: if the fetch fails, the tests fail with the fetch's message.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import from_sitk
from UNetSegmentLib.io import sample

SPACING = (0.95703125, 0.95703125, 1.5)


def _fetch(cache: Path, source: Path | None = None) -> Path:
    try:
        return sample.fetch_sample(cache, source=source)
    except InputError as err:  # a failure, never a skip
        pytest.fail(f"fetching the sample head CT failed: {err}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample")


@pytest.fixture(scope="module")
def sample_path(work) -> Path:
    """The sample built through the real path: apt-get download, dpkg -x, checks, NIfTI."""
    return _fetch(work / "cache")


@pytest.fixture(scope="module")
def ct(sample_path):
    import SimpleITK as sitk

    return from_sitk(sitk.ReadImage(str(sample_path)))


@pytest.fixture(scope="module")
def inv3(work) -> Path:
    """Cranium.inv3 taken from a freshly downloaded .deb."""
    d = work / "deb"
    d.mkdir()
    try:
        deb = sample._apt_download(d)
        return sample._inv3_from_deb(deb, d)
    except InputError as err:
        pytest.fail(f"downloading {sample.PACKAGE} failed: {err}")


def test_fetch_builds_nifti_and_reuses_cache(sample_path, work):
    assert sample_path == work / "cache" / "head_ct.nii.gz"
    assert sample_path.is_file() and sample_path.stat().st_size > 1_000_000
    mtime = sample_path.stat().st_mtime_ns
    assert sample.fetch_sample(work / "cache") == sample_path  # cached: not rebuilt
    assert sample_path.stat().st_mtime_ns == mtime
    assert not [p for p in sample_path.parent.iterdir() if p.name != "head_ct.nii.gz"]  # no temp files left


def test_shape_spacing_dtype(ct):
    assert ct.array.shape == (108, 256, 256)
    assert ct.array.dtype == np.int16
    np.testing.assert_allclose(ct.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(ct.direction, sample.SAMPLE_DIRECTION, atol=1e-6)
    assert -1100 <= ct.array.min() and ct.array.max() <= 3100  # Hounsfield units


def test_read_inv3_matches_nifti(inv3, ct):
    assert sample.sha256_file(inv3) == sample.INV3_SHA256
    img = sample.read_inv3(inv3)
    assert img.array.dtype == np.int16 and img.array.flags.writeable
    np.testing.assert_array_equal(img.array, ct.array)
    np.testing.assert_allclose(img.ijk_to_ras, ct.ijk_to_ras, atol=1e-4)


def test_source_argument_accepts_deb_and_inv3(inv3, work, ct):
    deb = next((work / "deb").glob("*.deb"))
    for name, src in (("from_deb", deb), ("from_inv3", inv3)):
        out = _fetch(work / name, source=src)
        assert out.name == "head_ct.nii.gz"
        import SimpleITK as sitk

        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), ct.array)


def test_corrupted_inv3_is_rejected(inv3, tmp_path):
    bad = tmp_path / "Cranium.inv3"
    shutil.copyfile(inv3, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(bad.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(InputError, match="SHA-256") as exc:
        sample.read_inv3(bad)
    assert exc.value.fix  # tells what to do
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="SHA-256"):
        sample.fetch_sample(cache, source=bad)
    assert not (cache / "head_ct.nii.gz").exists()


def test_truncated_inv3_is_rejected(inv3, tmp_path):
    bad = tmp_path / "short.inv3"
    bad.write_bytes(inv3.read_bytes()[:100_000])
    with pytest.raises(InputError):
        sample.read_inv3(bad)
    with pytest.raises(InputError):  # even without the digest check it is not readable
        sample.read_inv3(bad, check_sha256=False)


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        sample.fetch_sample(tmp_path / "c", source=tmp_path / "nope.deb")


# --- orientation, checked against anatomy in RAS (independent of index order) -------------------
def _head(ct):
    """RAS points of the head (largest > −300 HU component: drops the head rest) and its mask."""
    body = ct.array > -300
    lab, _ = ndimage.label(body)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == sizes.argmax()
    kji = np.argwhere(body)
    return body, ct.ijk_to_ras_points(kji[:, ::-1].astype(np.float64))


def test_superior_is_the_vertex(ct):
    """The head narrows to the vertex: its cross-section in the 15 mm at the top (max S) is far
    smaller than in the 15 mm at the bottom (maxilla/skull base)."""
    _, ras = _head(ct)
    s = ras[:, 2]
    top = np.count_nonzero(s > s.max() - 15.0)
    bottom = np.count_nonzero(s < s.min() + 15.0)
    assert top < 0.4 * bottom


def test_anterior_is_the_face(ct):
    """In the lower third of the head the air enclosed by it (nasal cavity, paranasal sinuses)
    lies anterior (+A) of the head's centre."""
    body, ras = _head(ct)
    filled = np.stack([ndimage.binary_fill_holes(sl) for sl in body])
    kji = np.argwhere(filled & (ct.array < -500))
    air = ct.ijk_to_ras_points(kji[:, ::-1].astype(np.float64))
    s_lo, s_hi = ras[:, 2].min(), ras[:, 2].max()
    low = air[air[:, 2] < s_lo + (s_hi - s_lo) / 3]
    assert len(low) > 1000
    assert np.mean(low[:, 1] > ras[:, 1].mean()) > 0.75
    assert low[:, 1].mean() > ras[:, 1].mean() + 20.0


def test_left_right_convention_is_documented():
    """Columns run toward the patient's left (DICOM axial convention): i → −R in RAS."""
    np.testing.assert_array_equal(sample.SAMPLE_DIRECTION[:, 0], [-1.0, 0.0, 0.0])
    assert "left" in sample.__doc__


def test_render_orientation_png(ct, tmp_path):
    out = sample.render_orientation_png(ct, tmp_path / "o.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UNETSEGMENT_CACHE", str(tmp_path / "x"))
    assert sample.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("UNETSEGMENT_CACHE")
    d = sample.default_cache_dir()
    assert d.name == "unetsegment" and d.parent.name == ".cache"
