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


def _transform_between(source_node, target_node):
    """The general transform from ``source_node``'s local frame to ``target_node``'s (None: world)."""
    import slicer
    import vtk

    t = vtk.vtkGeneralTransform()
    source = source_node.GetParentTransformNode() if source_node is not None else None
    target = target_node.GetParentTransformNode() if target_node is not None else None
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, t)
    return t


def to_world(node, ras) -> tuple[float, float, float]:
    """A point in ``node``'s local RAS frame mapped through its parent transforms to world RAS."""
    p = tuple(float(v) for v in ras)
    if node is None or node.GetParentTransformNode() is None:
        return p
    return tuple(float(v) for v in _transform_between(node, None).TransformPoint(p))


def roi_corners_in_frame(roi_node, frame_node) -> np.ndarray:
    """The 8 corners (8×3) of a markups ROI box in ``frame_node``'s local RAS frame.

    The ROI may be rotated (its object-to-node matrix) and both nodes may have parent transforms;
    ``GetRASBounds`` would give world bounds, which are not the input's frame once either is transformed.
    """
    import slicer

    b = [0.0] * 6
    roi_node.GetObjectBounds(b)
    obj_to_node = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToNodeMatrix())
    corners = np.array([[x, y, z, 1.0] for x in b[0:2] for y in b[2:4] for z in b[4:6]]) @ obj_to_node.T
    t = _transform_between(roi_node, frame_node)
    return np.array([t.TransformPoint(tuple(float(v) for v in c[:3])) for c in corners])
