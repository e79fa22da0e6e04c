"""Make Screenshots/report.png: the report of a `segment` run on a fully synthetic case.

The case is :func:`UNetSegmentLib.phantom.head_with_blob` (an ellipsoid head phantom, no blob) with the
demo's two synthetic bleeds painted in by :func:`UNetSegmentLib.synth.make_demo_case` — no patient data
and not the GPL-2 sample CT — segmented by the default model ``ct-hemorrhage`` with the CLI's defaults.

    .venv/bin/python docs/report_screenshot.py            # writes Screenshots/report.png
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNetSegment"))

from UNetSegmentLib.io.writers import write_image  # noqa: E402
from UNetSegmentLib.serving.job import segment_files  # noqa: E402
from UNetSegmentLib.phantom import head_with_blob  # noqa: E402
from UNetSegmentLib.synth import make_demo_case  # noqa: E402


def main(dest: Path = REPO / "Screenshots" / "report.png") -> Path:
    head, _ = head_with_blob(shape_kji=(56, 200, 180), spacing=(0.9, 0.9, 2.5), direction=np.diag([-1.0, 1.0, 1.0]),
                             origin=(0.0, 0.0, 0.0), seed=7, blob=False)
    ct, _ = make_demo_case(head, seed=2026)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "phantom_ct.nii.gz"
        write_image(ct, src)
        summary = segment_files([str(src)], Path(tmp) / "out", "ct-hemorrhage")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "out" / "report.png", dest)
    print(f"{dest}: {summary['n_lesions']} lesion(s), {summary['total_volume_ml']:.2f} mL")
    return dest


if __name__ == "__main__":
    main()
