"""The README and docs a newcomer acts on: the file list, the lesion-table columns (one definition in the
code, checked against a real run), the models' key limit, the model cards, the screenshot and how to cite."""
from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

from conftest import REPO, ct_phantom
from UNetSegmentLib import __version__
from UNetSegmentLib.io.writers import write_image
from UNetSegmentLib.serving.job import segment_files
from UNetSegmentLib.analysis.lesions import COLUMN_DOCS, INTENSITY_UNIT, columns_markdown
from UNetSegmentLib.io.outputs import CONTRACT_FILES
from UNetSegmentLib.params import SegmentParams

README = (REPO / "README.md").read_text(encoding="utf-8")
TABLE_DOC = (REPO / "docs" / "lesion-table.md").read_text(encoding="utf-8")


def _doc_rows() -> dict[str, str]:
    """column → unit, from the table rows of docs/lesion-table.md."""
    rows = re.findall(r"^\| \d+ \| `([a-z0-9_]+)` \| ([^|]*) \|", TABLE_DOC, flags=re.M)
    return {name: unit.strip() for name, unit in rows}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real `segment` run (tiny-blob on the CT phantom): its lesions.csv header and summary.json."""
    tmp = tmp_path_factory.mktemp("docs")
    img, _ = ct_phantom(shape_kji=(12, 96, 96), spacing=(1.2, 1.2, 4.0))
    write_image(img, tmp / "ct.nii.gz")
    summary = segment_files([str(tmp / "ct.nii.gz")], tmp / "out", "tiny-blob", SegmentParams(heatmaps=()))
    with open(tmp / "out" / "lesions.csv", newline="") as f:
        header = next(csv.reader(f))
    return header, json.loads((tmp / "out" / "summary.json").read_text())


def test_every_column_of_a_real_table_is_documented_with_its_unit(real_run):
    header, summary = real_run
    documented = _doc_rows()
    missing = [c for c in header if c not in documented]
    assert not missing, f"columns of lesions.csv missing from docs/lesion-table.md: {missing}"
    for c in header:
        unit = COLUMN_DOCS[c][0]
        want = "unit of the intensity channel" if unit == INTENSITY_UNIT else (unit or "–")
        assert documented[c] == want, c
    # summary.json carries the same units, per column, in the table's order
    assert list(summary["columns"]) == header
    assert summary["columns"]["mean_intensity"]["unit"] == "HU" and summary["intensity_channel"] == "CT"


def test_the_doc_table_is_generated_from_the_code():
    block = TABLE_DOC.split("<!-- columns:", 1)[1].split("-->", 1)[1].split("<!-- end columns -->", 1)[0]
    assert block.strip() == columns_markdown().strip(), "regenerate: python -m UNetSegmentLib.analysis.lesions"


def test_doc_states_the_conventions():
    for phrase in ("0-based", "RAS", "population", "ddof = 0", "centroid slice", "largest-area slice", "intensity_channel"):
        assert phrase in TABLE_DOC, phrase


def test_readme_lists_every_output_file_and_links_the_table():
    listed = set(re.findall(r"^  \| `([^`]+)`(?:, `([^`]+)`)? \|", README, flags=re.M))
    names = {n for pair in listed for n in pair if n}
    assert set(CONTRACT_FILES) <= names, set(CONTRACT_FILES) - names
    assert "(docs/lesion-table.md)" in README


def test_readme_warns_about_synthetic_training_before_the_commands():
    limit = README.find("trained **only on synthetic")
    assert 0 <= limit < README.find("## Command line")
    assert "not been measured" in README[limit:README.find("## Command line")]


def test_readme_links_exist():
    for target in ("Resources/Models/ct-hemorrhage/MODEL_CARD.md", "Resources/Models/mr-perfusion-lesion/MODEL_CARD.md",
                   "Resources/Models/tiny-blob/MODEL_CARD.md", "docs/lesion-table.md", "CITATION.cff",
                   "Screenshots/report.png"):
        assert f"]({target})" in README, target
        assert (REPO / target).is_file(), target
    assert "](Screenshots/1.png)" in README  # the Slicer screenshot
    assert "synthetic" in README[README.find("](Screenshots/report.png)"):][:400]  # says it is not patient data
    models = sorted(p.parent.name for p in (REPO / "Resources" / "Models").glob("*/model.json"))
    assert all(f"Resources/Models/{m}/MODEL_CARD.md" in README for m in models)


def test_citation_cff():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["title"] and cff["authors"] and cff["message"]
    assert cff["version"] == __version__ and cff["license"] == "Apache-2.0"
    assert "## How to cite" in README and "CITATION.cff" in README
