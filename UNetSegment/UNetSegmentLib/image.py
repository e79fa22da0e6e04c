"""The one image type of the core: a K,J,I array plus its 4×4 IJK→RAS matrix.

Slicer works in RAS; ITK, DICOM and NRRD/NIfTI files store LPS. The conversion happens only in
:func:`to_sitk` / :func:`from_sitk` (and the writers that build on them). Nothing else in the core
knows about LPS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Image:
    """A volume: ``array[k, j, i]`` and ``ijk_to_ras`` (4×4, maps (i, j, k, 1) to (R, A, S, 1))."""

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4x4, got {m.shape}")
        m = m.copy()
        m.setflags(write=False)
        object.__setattr__(self, "ijk_to_ras", m)

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape[:3]
        return (i, j, k)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose columns are the unit RAS directions of i, j, k."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)'s centre."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_ras

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.ijk_to_ras[:3, :3])))

    def with_array(self, array: np.ndarray) -> "Image":
        """Same grid, other voxels (the shape must match)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return Image(array, self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map N×3 (i, j, k) continuous indices to N×3 RAS points."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: "Image", atol: float = 1e-5) -> bool:
        return self.array.shape[:3] == other.array.shape[:3] and np.allclose(
            self.ijk_to_ras, other.ijk_to_ras, atol=atol
        )

    def corners_ras(self) -> np.ndarray:
        """RAS positions of the 8 outer voxel-centre corners."""
        i, j, k = (s - 1 for s in self.shape_ijk)
        c = np.array([[a, b, d] for a in (0, i) for b in (0, j) for d in (0, k)], dtype=np.float64)
        return self.ijk_to_ras_points(c)


def make_ijk_to_ras(spacing, direction=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Build a 4×4 IJK→RAS matrix from spacing (i, j, k), RAS direction columns and RAS origin."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, dtype=np.float64)
    m[:3, 3] = origin
    return m


def slice_axis(ijk_to_ras: np.ndarray) -> int:
    """Index (0=i, 1=j, 2=k) of the voxel axis closest to superior–inferior."""
    d = np.asarray(ijk_to_ras)[:3, :3]
    d = d / np.linalg.norm(d, axis=0)
    return int(np.argmax(np.abs(d[2, :])))


# --- SimpleITK edge (the only LPS↔RAS conversion) ---------------------------------------------
def to_sitk(image: Image):
    """SimpleITK image (LPS) from an :class:`Image`. Vector images are not supported."""
    import SimpleITK as sitk

    arr = np.ascontiguousarray(image.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    out = sitk.GetImageFromArray(arr, isVector=False)
    lps = image.ijk_to_lps
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    out.SetSpacing(tuple(float(s) for s in spacing))
    out.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    out.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return out


def from_sitk(img, array: np.ndarray | None = None) -> Image:
    """:class:`Image` (RAS) from a 3D SimpleITK image."""
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise ValueError("from_sitk expects a 3D image")
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = img.GetOrigin()
    arr = sitk.GetArrayFromImage(img) if array is None else array
    return Image(arr, LPS_TO_RAS @ lps)


def resample(
    image: Image,
    shape_kji: tuple[int, int, int],
    ijk_to_ras: np.ndarray,
    order: int = 1,
    fill: float = 0.0,
    dtype=None,
) -> Image:
    """Resample ``image`` onto another grid in physical space (order 0 nearest, 1 linear, 3 B-spline)."""
    import SimpleITK as sitk

    src = to_sitk(Image(image.array.astype(np.float32, copy=False) if order else image.array, image.ijk_to_ras))
    ref = to_sitk(Image(np.zeros((1, 1, 1), np.uint8), ijk_to_ras))
    ref_size = (int(shape_kji[2]), int(shape_kji[1]), int(shape_kji[0]))
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    f = sitk.ResampleImageFilter()
    f.SetSize(ref_size)
    f.SetOutputSpacing(ref.GetSpacing())
    f.SetOutputDirection(ref.GetDirection())
    f.SetOutputOrigin(ref.GetOrigin())
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(float(fill))
    f.SetOutputPixelType(src.GetPixelID())
    out = sitk.GetArrayFromImage(f.Execute(src))
    if dtype is not None:
        out = out.astype(dtype, copy=False)
    return Image(out, ijk_to_ras)
