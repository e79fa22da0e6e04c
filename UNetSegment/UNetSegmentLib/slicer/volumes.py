"""MRML volume nodes ⇄ core :class:`~UNetSegmentLib.image.Image` (array K,J,I + 4×4 IJK→RAS).

Reading always copies (``arrayFromVolume`` is a live view of the user's data); nothing here
writes into a node it did not create.
"""
from __future__ import annotations

import numpy as np

from ..image import Image


def image_from_volume(node) -> Image:
    """A copy of a scalar volume node's voxels with its IJK→RAS (the node's local frame)."""
    import slicer
    import vtk

    if node is None or node.GetImageData() is None:
        from ..errors import InputError

        raise InputError(f"volume {node.GetName() if node is not None else '(none)'} has no voxels", "load the volume again")
    arr = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if arr.ndim != 3:
        from ..errors import InputError

        raise InputError(f"{node.GetName()} is not a 3D scalar volume (array shape {arr.shape})",
                         "pick one scalar volume per model channel")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return Image(arr, slicer.util.arrayFromVTKMatrix(m))


def _safe_dtype(a: np.ndarray) -> np.ndarray:
    """VTK rejects ``long long``: int64/uint64 label maps become int32, bool becomes uint8."""
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype in (np.int64, np.uint64):
        return a.astype(np.int32)
    return a


def add_volume(image: Image, name: str, label: bool = False):
    """A new (scalar or labelmap) volume node holding ``image``, with display nodes."""
    import slicer

    cls = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(_safe_dtype(np.asarray(image.array)), image.ijk_to_ras,
                                          slicer.mrmlScene.GenerateUniqueName(name), cls)


def update_volume(node, image: Image) -> None:
    """Replace voxels and geometry of a node created by this module."""
    import slicer

    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(image.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, _safe_dtype(np.asarray(image.array)))


def labelmap_node_without_display(image: Image, name: str = "UNetSegment temporary labels"):
    """A labelmap node for a one-off import (no display nodes, so removing it leaves nothing behind)."""
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    update_volume(node, image)
    return node


def to_world(node, ras) -> tuple[float, float, float]:
    """A point in ``node``'s local RAS frame mapped through its parent transforms to world RAS."""
    import slicer
    import vtk

    p = tuple(float(v) for v in ras)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return p
    t = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, t)
    return tuple(float(v) for v in t.TransformPoint(p))
