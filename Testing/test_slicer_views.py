"""Slicer's real slice and 3D views after Segment, rendered offscreen and checked pixel by pixel.

The views are trame-slicer's ``DirectViewFactory`` views driven by Slicer's own displayable managers
(slice layers, segmentation 2D fill and outline, 3D closed surfaces). After a run the module shows
the input as background, the probability map as foreground at its default opacity and the
segmentation; a table-row click moves every slice plane to the lesion. The PNGs go to
``Testing/screenshots/`` (or ``$UNETSEGMENT_SCREENSHOTS``): look at them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standin  # noqa: E402

STANDIN = slicer_standin.install()

import slicer  # noqa: E402

from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.phantom import head_with_blob  # noqa: E402
from UNetSegmentLib.slicer import scene as sc  # noqa: E402
from UNetSegmentLib.slicer.logic import RunRequest, SegmentationLogic  # noqa: E402
from UNetSegmentLib.slicer.volumes import add_volume  # noqa: E402

SHOTS = Path(os.environ.get("UNETSEGMENT_SCREENSHOTS", Path(__file__).resolve().parent / "screenshots"))
SLICE_VIEWS = ("axial", "coronal", "sagittal")


@pytest.fixture(autouse=True, scope="module")
def harness():
    slicer_standin.install()
    yield STANDIN
    slicer_standin.uninstall()


def segment(node, model: str, heatmaps=("gradcam",)):
    logic = SegmentationLogic(dependency_check=lambda: True)
    out = {}
    logic.finished.connect(lambda r: out.setdefault("result", r))
    logic.failed.connect(lambda ev: out.setdefault("error", ev))
    logic.start(RunRequest([node], model, SegmentParams(device="cpu", heatmaps=heatmaps)))
    assert STANDIN.run_until(lambda: bool(out), 300), "the run did not end"
    assert "result" in out, out
    logic.worker.shutdown()  # the result is in the scene: no need to keep the warm worker
    return logic, out["result"]


def patch(img: np.ndarray, rc) -> np.ndarray:
    """Mean colour of the 3×3 pixels around (row, column)."""
    r, c = rc
    return img[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3).astype(float).mean(0)


def montage(images: dict, path: Path) -> Path:
    """The four views as one 2×2 picture (axial, 3D / coronal, sagittal)."""
    from matplotlib import image as mpimg

    top = np.concatenate([images["axial"], images["3d"]], axis=1)
    bottom = np.concatenate([images["coronal"], images["sagittal"]], axis=1)
    grid = np.concatenate([top, bottom], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, grid)
    return path


def show_and_render(result, prefix: str) -> dict:
    """After the row click: every view rendered and written as ``<prefix>-<view>.png``."""
    STANDIN.fit_3d()
    images = {}
    for name in (*SLICE_VIEWS, "3d"):
        images[name] = STANDIN.render(name)
        STANDIN.save_png(name, SHOTS / f"{prefix}-{name}.png")
    montage(images, SHOTS / f"{prefix}-views.png")
    print(f"\nrendered views: {SHOTS}/{prefix}-*.png")
    return images


def world_voxel_point(image, kji) -> tuple[float, float, float]:
    k, j, i = kji
    return tuple(float(v) for v in (image.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3])


def control_point(image, lesion_mask: np.ndarray, inside_kji, slice_axis_view: str):
    """A voxel in the head, on the inside point's plane for ``slice_axis_view``, ≥ 25 mm from any lesion voxel."""
    from scipy import ndimage

    spacing = np.abs(np.linalg.norm(image.ijk_to_ras[:3, :3], axis=0))[::-1]  # k, j, i
    far = ndimage.distance_transform_edt(~lesion_mask, sampling=spacing) > 25.0
    head = ndimage.binary_erosion(image.array > -200, iterations=4)
    candidates = np.argwhere(far & head)
    inside_world = np.array(world_voxel_point(image, inside_kji))
    normal = {"axial": 2, "coronal": 1, "sagittal": 0}[slice_axis_view]  # RAS axis across the view's plane
    worlds = (image.ijk_to_ras @ np.c_[candidates[:, ::-1], np.ones(len(candidates))].T).T[:, :3]
    on_plane = np.abs(worlds[:, normal] - inside_world[normal]) < 0.6 * spacing.min()
    assert on_plane.any(), f"no lesion-free head voxel on the {slice_axis_view} plane"
    pick = np.argmin(np.abs(np.linalg.norm(worlds[on_plane] - inside_world, axis=1) - 40.0))
    return tuple(worlds[on_plane][pick])


def check_segment_colour_in_slice_views(result, image, mask: np.ndarray, inside, prefix: str) -> dict:
    """The segment's colour is drawn at the lesion and nowhere near a lesion-free control point."""
    images = show_and_render(result, prefix)
    seg = result.segmentation
    colour = 255.0 * np.array(seg.GetSegmentation().GetSegment(sc.segment_id(result.bundle.labels[0]["value"])).GetColor())
    inside_kji = tuple(np.rint(np.linalg.inv(image.ijk_to_ras) @ np.array([*inside, 1.0]))[:3][::-1].astype(int))
    assert mask[inside_kji], "the inside point is not a lesion voxel"
    seg.GetDisplayNode().SetVisibility(False)
    hidden = {name: STANDIN.render(name) for name in SLICE_VIEWS}
    seg.GetDisplayNode().SetVisibility(True)
    for name in SLICE_VIEWS:
        at = STANDIN.ras_to_pixel(name, inside)
        shown_px, hidden_px = patch(images[name], at), patch(hidden[name], at)
        # drawing the segment moved the pixel towards the segment's colour
        assert np.linalg.norm(shown_px - colour) < np.linalg.norm(hidden_px - colour) - 20.0, \
            (name, at, shown_px, hidden_px, colour)
        ctrl = STANDIN.ras_to_pixel(name, control_point(image, mask, inside_kji, name))
        assert np.abs(patch(images[name], ctrl) - patch(hidden[name], ctrl)).max() < 3.0, (name, "control", ctrl)
    return images


def display_point(view, ras) -> tuple[int, int]:
    """Where a world RAS point lands in a 3D view's rendered image (row, column; row 0 at the top)."""
    renderer = view.renderer()
    renderer.SetWorldPoint(*[float(v) for v in ras], 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    return int(round(view.render_window().GetSize()[1] - 1 - y)), int(round(x))


def check_surface_in_3d(result, inside) -> None:
    """The closed surface is what the 3D view draws at the lesion: hiding it in 3D changes that pixel."""
    display = result.segmentation.GetDisplayNode()
    view = STANDIN.views["3d"]
    for node in STANDIN.slice_nodes():  # the slice planes carry the red-ish 2D fill and heatmap too
        node.SetSliceVisible(False)
    try:
        shown = STANDIN.render("3d")
        display.SetVisibility3D(False)
        hidden = STANDIN.render("3d")
    finally:
        display.SetVisibility3D(True)
        for node in STANDIN.slice_nodes():
            node.SetSliceVisible(True)
    at = display_point(view, inside)
    colour = 255.0 * np.array(result.segmentation.GetSegmentation().GetSegment(sc.segment_id(1)).GetColor())
    dominant = int(np.argmax(colour))
    assert patch(shown, at)[dominant] > patch(hidden, at)[dominant] + 40.0, (at, patch(shown, at), patch(hidden, at))


def test_demo_case_views_show_the_segment_at_the_lesion_and_jump_to_it():
    """The demo case (sample head CT + synthetic hemorrhage, ct-hemorrhage): Segment, row click, render."""
    STANDIN.reset()
    image_path, label_path = demo_case()
    image, truth = read_image(image_path), read_image(label_path)
    node = add_volume(image, "demo CT")
    logic, result = segment(node, "ct-hemorrhage")
    STANDIN.fit_slice_views()  # as loading a volume does in Slicer (fitting later would undo the jump)
    # the module's display: input in the background, probability in the foreground at the default opacity
    assert STANDIN.background_ids() == {node.GetID()}
    assert STANDIN.foreground_ids() == {result.heatmaps["probability"].GetID()}
    assert STANDIN.foreground_opacities() == {0.5}
    point = logic.jump_to_table_row(result, 0)  # the row click
    row = result.lesions.rows[0]
    inside = (row["inside_r"], row["inside_a"], row["inside_s"])
    assert point == pytest.approx(inside)
    for slice_node in STANDIN.slice_nodes():  # every slice plane passes through the inside point
        ras_to_slice = np.linalg.inv(slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS()))
        assert abs((ras_to_slice @ np.array([*inside, 1.0]))[2]) < 1e-3
    predicted = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentation, sc.segment_id(1), node) > 0
    assert (predicted & (truth.array > 0)).sum() > 0.5 * (truth.array > 0).sum()  # it found the hemorrhage
    images = check_segment_colour_in_slice_views(result, image, predicted | (truth.array > 0), inside, "demo")
    check_surface_in_3d(result, inside)


def test_phantom_views_for_the_extension_screenshot():
    """A synthetic phantom (no third-party data): the picture committed as Screenshots/1.png."""
    STANDIN.reset()
    image, blob = head_with_blob(shape_kji=(40, 160, 160), spacing=(1.0, 1.0, 2.5))
    node = add_volume(image, "phantom CT")
    logic, result = segment(node, "tiny-blob")
    STANDIN.fit_slice_views()
    point = logic.jump_to_table_row(result, 0)
    check_segment_colour_in_slice_views(result, image, blob, point, "phantom")
    check_surface_in_3d(result, point)
