"""Each class's own probability map of a multi-class bundle, in one file: ``class_probabilities.nrrd``.

``probability.nrrd`` is P(lesion), the lesion labels' probabilities summed: the map the threshold, the
live threshold and the uncertainty read. A bundle with several labels (bleed compartments plus
oedema) also has one softmax probability per label; they are written together, as one NRRD whose
voxels hold a vector with one component per label in ``model.json`` order, on the input grid (the
grid of ``probability.nrrd``, floored the same way). The NRRD key ``UNetSegment_labels`` names the
components (one JSON line: ``[[1, "intraparenchymal hemorrhage"], …]``), and ``summary.json`` lists them
under ``class_probabilities``. The Slicer module shows each component as an overlay of its own (listed
as "Probability: intraventricular hemorrhage", node "… P(intraventricular hemorrhage)"); in Python,
:func:`read_class_probabilities` gives one
:class:`~UNetSegmentLib.image.Image` per label value. One-label bundles write no such file: their
``probability.nrrd`` is the class's map.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from ..errors import InputError
from ..image import Image, from_sitk, to_sitk
from .writers import atomic_path

#: the file name (one of the ``segment`` contract's files)
CLASS_PROBABILITIES_FILE = "class_probabilities.nrrd"
#: the NRRD key naming the components
LABELS_KEY = "UNetSegment_labels"


def write_class_probabilities(maps: Mapping[int, Image], names: Mapping[int, str], path: str | os.PathLike) -> None:
    """Write ``maps`` (label value → probability on one grid) as one vector NRRD, components in
    ``names``' order (the bundle's label order), atomically."""
    import SimpleITK as sitk

    values = list(names)
    if set(values) != set(maps):
        raise ValueError(f"class maps for labels {sorted(maps)}, names for {sorted(values)}")
    first = maps[values[0]]
    for v in values[1:]:
        if not maps[v].same_grid(first):
            raise ValueError(f"the map of label {v} is on another grid than label {values[0]}'s")
    vec = sitk.GetImageFromArray(np.stack([np.asarray(maps[v].array, np.float32) for v in values], axis=-1),
                                 isVector=True)
    ref = to_sitk(Image(np.zeros((1, 1, 1), np.uint8), first.ijk_to_ras))  # the grid's geometry only
    vec.SetSpacing(ref.GetSpacing())
    vec.SetDirection(ref.GetDirection())
    vec.SetOrigin(ref.GetOrigin())
    vec.SetMetaData(LABELS_KEY, json.dumps([[int(v), str(names[v])] for v in values], ensure_ascii=True))  # one line
    with atomic_path(path) as tmp:
        sitk.WriteImage(vec, str(tmp), useCompression=True)


def read_class_probabilities(path: str | os.PathLike) -> dict[int, Image]:
    """The maps a :func:`write_class_probabilities` file holds: label value → probability image.
    A file that cannot be read, or names no classes, raises :class:`InputError`."""
    import SimpleITK as sitk

    from .readers import _itk_read_errors

    with _itk_read_errors(os.path.basename(path)):
        img = sitk.ReadImage(str(path))
    try:
        values = [int(v) for v, _ in json.loads(img.GetMetaData(LABELS_KEY))]
    except (RuntimeError, ValueError, TypeError) as e:  # key absent (RuntimeError) or not our JSON
        raise InputError(f"{path} does not name its classes ({LABELS_KEY}: {e})",
                         "read the class_probabilities.nrrd a segment run wrote, or run the segmentation again") from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:  # a one-component vector reads back as a scalar volume
        arr = arr[..., None]
    if arr.shape[-1] != len(values):
        raise InputError(f"{path} has {arr.shape[-1]} components for {len(values)} named classes",
                         "write the file again with unetsegment segment")
    return {v: from_sitk(img, np.ascontiguousarray(arr[..., c])) for c, v in enumerate(values)}
