"""The sample head CT: fetched from the Debian package ``invesalius-examples``, cached as NIfTI.

Source
    Debian package ``invesalius-examples`` 3.1.99998-4 (arch ``all``) ships
    ``usr/share/doc/invesalius-examples/examples/Cranium.inv3``, an InVesalius 3 project: a
    tar.gz holding one folder with ``main.plist`` (metadata) and ``matrix.dat`` (raw little-endian
    int16, C order ``[slice, row, col]`` = 108 × 256 × 256). Case "ProMED CT 0051", CT in HU,
    pixel spacing 0.9570312 mm, slice spacing 1.5 mm. Both files are checked against pinned
    SHA-256 digests before anything is built from them.

Geometry (the project file carries no patient orientation, so it is established from anatomy)
    * ``k`` (slice) runs inferior → superior: the maxilla and teeth are in the first slices, the
      vertex in the last ones.
    * ``j`` (row) runs posterior → anterior: the head-rest arc and occiput are at low rows; the
      orbits, nose and frontal sinus at high rows. (DICOM rows run anterior → posterior;
      InVesalius stores the slices flipped vertically, VTK's lower-left origin convention.)
    * ``i`` (column) runs patient right → left. A head is left/right symmetric, so this cannot
      be read off the anatomy; it is the standard DICOM axial acquisition (first column at the
      patient's right, row direction +x_LPS = toward the patient's left), which InVesalius's
      vertical flip leaves unchanged.

    Hence the IJK→RAS direction matrix (columns = RAS directions of i, j, k) is::

        [[-1, 0, 0],
         [ 0, 1, 0],
         [ 0, 0, 1]]

    with spacing (0.9570312, 0.9570312, 1.5) mm, and the origin chosen so that the centre of the
    grid is at RAS (0, 0, 0). :func:`render_orientation_png` draws axial/coronal/sagittal views
    resampled through this matrix (radiological convention) to check it by eye.
"""
from __future__ import annotations

import hashlib
import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import InputError, OutputError
from ..image import Image, make_ijk_to_ras
from ..models.bundle import sha256_file
from .writers import write_image

PACKAGE = "invesalius-examples"
PACKAGE_VERSION = "3.1.99998-4"
INV3_PATH_IN_DEB = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
INV3_SHA256 = "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a"
MATRIX_SHA256 = "d87fd5e6aaf2c4fdf4f3fe28ee3335192fc2464ed8e9682fc78530cb837938da"
SAMPLE_FILENAME = "head_ct.nii.gz"
SAMPLE_SHAPE_KJI = (108, 256, 256)

#: RAS direction of the i (column), j (row) and k (slice) axes of Cranium.inv3 (see module doc).
SAMPLE_DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])

_MANUAL_FIX = (
    f"download {PACKAGE}_{PACKAGE_VERSION}_all.deb from packages.debian.org by hand and run "
    f"`unetsegment fetch-sample --source {PACKAGE}_{PACKAGE_VERSION}_all.deb` (or give it the Cranium.inv3 inside)"
)


# --- cache ------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$UNETSEGMENT_CACHE``; else ``<repo>/.cache/unetsegment`` in a source checkout; else
    ``~/.cache/unetsegment``."""
    env = os.environ.get("UNETSEGMENT_CACHE")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file() and (repo / "UNetSegment" / "UNetSegmentLib").is_dir():
        return repo / ".cache" / "unetsegment"
    return Path.home() / ".cache" / "unetsegment"


def fetch_sample(cache_dir: Path | None = None, source: Path | None = None) -> Path:
    """Path of ``<cache>/head_ct.nii.gz``, building it first if it is not there yet.

    ``source`` may name an already downloaded ``.deb`` of ``invesalius-examples`` or the
    ``Cranium.inv3`` taken from it; otherwise the package is fetched with ``apt-get download``
    (running ``apt-get update`` only if apt has no package lists). The project file is checked
    against the pinned SHA-256 digests, read in memory (no archive member is ever extracted to
    disk) and written as int16 NIfTI atomically (temporary file in the cache folder, then
    ``os.replace``). Raises :class:`InputError` when apt is missing or fails, or a digest does not
    match.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / SAMPLE_FILENAME
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="unetsegment-sample-") as tmp:
        tmpdir = Path(tmp)
        if source is None:
            inv3 = _inv3_from_deb(_apt_download(tmpdir), tmpdir)
        else:
            source = Path(source).expanduser()
            if not source.is_file():
                raise InputError(f"sample source {source} does not exist", "give --source the path of the .deb or of Cranium.inv3")
            inv3 = _inv3_from_deb(source, tmpdir) if source.suffix == ".deb" else source
        image = read_inv3(inv3)
    _write_nifti_atomic(image, out)
    return out


def load_sample(cache_dir: Path | None = None, source: Path | None = None) -> Image:
    """The sample head CT as an :class:`Image` (fetched on first use)."""
    import SimpleITK as sitk

    from ..image import from_sitk

    return from_sitk(sitk.ReadImage(str(fetch_sample(cache_dir, source))))


# --- reading ----------------------------------------------------------------------------------
def _safe_member(member: tarfile.TarInfo) -> bool:
    p = PurePosixPath(member.name)
    return member.isfile() and not p.is_absolute() and ".." not in p.parts


def read_inv3(path: Path, check_sha256: bool = True) -> Image:
    """Read the CT volume of ``Cranium.inv3`` (InVesalius 3 project) into an :class:`Image`.

    With ``check_sha256`` (the default) the file and its ``matrix.dat`` must match the pinned
    digests of the ``invesalius-examples`` 3.1.99998-4 sample, whose geometry is known (module doc).
    """
    path = Path(path)
    if check_sha256:
        digest = sha256_file(path)
        if digest != INV3_SHA256:
            raise InputError(
                f"{path} has SHA-256 {digest}, expected {INV3_SHA256} (Cranium.inv3 of {PACKAGE} {PACKAGE_VERSION})",
                f"delete it and fetch the sample again, or {_MANUAL_FIX}",
            )
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if _safe_member(m)}
            if "main.plist" not in members or "matrix.dat" not in members:
                raise InputError(f"{path} holds no main.plist/matrix.dat", "pass the Cranium.inv3 of invesalius-examples")
            meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            mat = meta["matrix"]
            shape = tuple(int(s) for s in mat["shape"])
            dtype = np.dtype(mat["dtype"]).newbyteorder("<")
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if len(shape) != 3 or members["matrix.dat"].size != nbytes:
                raise InputError(f"{path}: matrix.dat does not hold a {shape} {dtype} volume", "pass an intact Cranium.inv3")
            raw = tar.extractfile(members["matrix.dat"]).read()
    except (tarfile.TarError, plistlib.InvalidFileException, KeyError, ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read InVesalius project {path}: {exc}", "pass an intact Cranium.inv3") from exc
    if check_sha256:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != MATRIX_SHA256:
            raise InputError(
                f"matrix.dat in {path} has SHA-256 {digest}, expected {MATRIX_SHA256}",
                f"delete it and fetch the sample again, or {_MANUAL_FIX}",
            )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))  # native, writable
    spacing = [float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))]  # x (i), y (j), z (k)
    m = make_ijk_to_ras(spacing, SAMPLE_DIRECTION)
    centre = (np.array(array.shape[::-1], dtype=np.float64) - 1.0) / 2.0
    m[:3, 3] = -m[:3, :3] @ centre
    return Image(array, m)


# --- apt / dpkg ---------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise InputError(f"`{' '.join(cmd)}` timed out", f"check the network, or {_MANUAL_FIX}") from exc
    except OSError as exc:
        raise InputError(f"cannot run `{' '.join(cmd)}`: {exc}", _MANUAL_FIX) from exc


def _lists_missing(stderr: str) -> bool:
    s = stderr.lower()
    return any(
        t in s
        for t in ("unable to locate package", "has no installation candidate", "no packages found", "can't select candidate")
    )


def _apt_download(workdir: Path) -> Path:
    """``apt-get download invesalius-examples`` into ``workdir``; the path of the .deb."""
    if shutil.which("apt-get") is None:
        raise InputError(
            f"apt-get not found: the sample head CT comes from the Debian package {PACKAGE}", _MANUAL_FIX
        )
    workdir.chmod(0o755)  # apt downloads as the unprivileged _apt user where it can
    cmd = ["apt-get", "download", PACKAGE]
    proc = _run(cmd, workdir)
    if proc.returncode != 0 and _lists_missing(proc.stderr):
        upd = _run(["apt-get", "update"], workdir)
        if upd.returncode != 0:
            raise InputError(
                f"`apt-get update` failed: {upd.stderr.strip()[-400:]}",
                f"run it as root with network access, or {_MANUAL_FIX}",
            )
        proc = _run(cmd, workdir)
    if proc.returncode != 0:
        raise InputError(
            f"`apt-get download {PACKAGE}` failed: {proc.stderr.strip()[-400:]}",
            f"check network access to the Debian archive, or {_MANUAL_FIX}",
        )
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise InputError(f"`apt-get download {PACKAGE}` produced no .deb", _MANUAL_FIX)
    return debs[-1]


def _inv3_from_deb(deb: Path, workdir: Path) -> Path:
    """Unpack ``deb`` with ``dpkg -x`` under ``workdir``; the path of Cranium.inv3 inside."""
    if shutil.which("dpkg") is None:
        raise InputError(f"dpkg not found: cannot unpack {deb}", "install dpkg, or give the Cranium.inv3 inside it: `unetsegment fetch-sample --source Cranium.inv3`")
    dest = workdir / "deb"
    dest.mkdir()
    proc = _run(["dpkg", "-x", str(Path(deb).resolve()), str(dest)], workdir)
    if proc.returncode != 0:
        raise InputError(f"`dpkg -x {deb}` failed: {proc.stderr.strip()[-400:]}", f"delete {deb} and retry, or {_MANUAL_FIX}")
    inv3 = dest / INV3_PATH_IN_DEB
    if not inv3.is_file():
        raise InputError(f"{deb} holds no {INV3_PATH_IN_DEB}", f"pass the {PACKAGE} {PACKAGE_VERSION} package")
    return inv3


def _write_nifti_atomic(image: Image, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_image(image, out)  # atomic, 0666 & ~umask
    except OSError as exc:
        raise OutputError(f"cannot write in {out.parent}: {exc}", "set UNETSEGMENT_CACHE or pass cache_dir") from exc


# --- orientation check ----------------------------------------------------------------------------
def _sample_plane(image: Image, origin: np.ndarray, right: np.ndarray, down: np.ndarray, n_cols: int, n_rows: int,
                  step: float) -> np.ndarray:
    """Resample a plane through RAS ``origin`` (top-left pixel) along RAS unit vectors
    ``right`` (image columns) and ``down`` (image rows), linear interpolation, NaN outside."""
    from scipy import ndimage

    r, c = np.mgrid[0:n_rows, 0:n_cols].astype(np.float64)
    ras = origin + (c[..., None] * step) * right + (r[..., None] * step) * down
    ijk = image.ras_to_ijk_points(ras.reshape(-1, 3))
    coords = ijk[:, ::-1].T  # array axes are k, j, i
    vals = ndimage.map_coordinates(np.asarray(image.array, dtype=np.float32), coords, order=1, mode="constant", cval=np.nan)
    return vals.reshape(n_rows, n_cols)


def render_orientation_png(image: Image, path, axial_s: list[float] | None = None, coronal_a: float | None = None,
                           sagittal_r: float | None = None, window: tuple[float, float] = (40.0, 400.0)) -> Path:
    """Draw axial, coronal and sagittal slices of ``image`` to a PNG, resampled through its
    IJK→RAS matrix (so a wrong matrix shows as a wrongly oriented picture).

    Radiological display convention: axial views are seen from the feet (anterior at the top,
    patient left on the image right), the coronal view from the front (superior at the top,
    patient left on the image right), the sagittal view from the patient's left (superior at the
    top, anterior on the image left). Each panel is labelled with the RAS letters of its edges.
    ``axial_s`` (default: two levels, 30 % and 60 % up the head), ``coronal_a`` and ``sagittal_r``
    (default: the head's centre) are RAS positions in mm; ``window`` is (level, width) in HU.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

    corners = image.corners_ras()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    step = float(min(image.spacing))
    # the head: voxels above -300 HU (bounding box in RAS, from a subsample)
    arr = np.asarray(image.array)
    sub = (slice(None, None, 2),) * 3
    kji = np.argwhere(arr[sub] > -300) * 2
    if len(kji):
        head = image.ijk_to_ras_points(kji[:, ::-1].astype(np.float64))
        hlo, hhi = np.percentile(head, 1, axis=0), np.percentile(head, 99, axis=0)
        centre = np.median(head, axis=0)
    else:
        hlo, hhi, centre = lo, hi, (lo + hi) / 2
    if axial_s is None:
        axial_s = [float(hlo[2] + f * (hhi[2] - hlo[2])) for f in (0.3, 0.6)]
    coronal_a = float(centre[1]) if coronal_a is None else float(coronal_a)
    sagittal_r = float(centre[0]) if sagittal_r is None else float(sagittal_r)
    R, A, S = np.eye(3)
    n = lambda a, b: int(np.ceil((b - a) / step)) + 1  # noqa: E731
    panels = []
    for s in axial_s:  # top-left = (R max, A max); columns toward L (−R), rows toward P (−A)
        img = _sample_plane(image, np.array([hi[0], hi[1], s]), -R, -A, n(lo[0], hi[0]), n(lo[1], hi[1]), step)
        panels.append((f"axial S={s:.0f} mm", img, ("A", "P", "R", "L")))
    img = _sample_plane(image, np.array([hi[0], coronal_a, hi[2]]), -R, -S, n(lo[0], hi[0]), n(lo[2], hi[2]), step)
    panels.append((f"coronal A={coronal_a:.0f} mm", img, ("S", "I", "R", "L")))
    img = _sample_plane(image, np.array([sagittal_r, hi[1], hi[2]]), -A, -S, n(lo[1], hi[1]), n(lo[2], hi[2]), step)
    panels.append((f"sagittal R={sagittal_r:.0f} mm", img, ("S", "I", "A", "P")))

    level, width = window
    fig = Figure(figsize=(4.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels))
    for ax, (title, img, (top, bottom, left, right)) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.nan_to_num(img, nan=-1024), cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
                  interpolation="bilinear")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        kw = dict(color="yellow", fontsize=13, fontweight="bold", transform=ax.transAxes, ha="center", va="center")
        ax.text(0.5, 0.96, top, **kw)
        ax.text(0.5, 0.04, bottom, **kw)
        ax.text(0.04, 0.5, left, **kw)
        ax.text(0.96, 0.5, right, **kw)
    fig.suptitle("Radiological convention: patient left on image right; axial seen from the feet", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
