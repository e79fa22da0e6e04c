"""What a new user meets first: help for every command, readable output modes, progress, consistent
summaries, the lean install and its one-line "install the extra" errors (issue 14, items 1, 2, 7, 9, 11)."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import REPO, ct_phantom, write_bundle

from UNetSegmentLib import __version__
from UNetSegmentLib.cli import _Progress, build_parser, main
from UNetSegmentLib.settings import resolve
from UNetSegmentLib.errors import EXTRAS
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.outputs import CONTRACT_FILES


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))


@pytest.fixture
def ct_file(tmp_path) -> Path:
    img, _ = ct_phantom(shape_kji=(12, 48, 40))
    p = tmp_path / "ct.nii.gz"
    sitk.WriteImage(to_sitk(img), str(p))
    return p


# --------------------------------------------------------------------------------------------
# Item 1: --help for the tool and every (nested) subcommand; -V
# --------------------------------------------------------------------------------------------
def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path the parser accepts, from its own subparser actions (nothing hard-coded)."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, prefix + (name,))
    return paths


def test_help_works_for_the_tool_and_every_subcommand(capsys):
    paths = _command_paths(build_parser())
    assert {("segment",), ("batch",), ("serve",), ("models", "list")} <= set(paths)  # the walk found the tree
    for path in paths:
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        out = capsys.readouterr()
        assert exc.value.code == 0, f"{' '.join(path)} --help: {out.err.strip()[-300:]}"
        assert out.out.startswith("usage: unetsegment") and not out.err, path
    # the percent sign of the engine help is printed, not read as a format code
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "99.99 % of voxels" in " ".join(capsys.readouterr().out.split())


def test_help_and_version_from_the_installed_entry_point():
    """The real process: usage on stdout, exit 0, no traceback; -V and --version agree."""
    cli = [sys.executable, "-m", "UNetSegmentLib.cli"]
    r = subprocess.run(cli + ["segment", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and "--engine" in r.stdout and "Traceback" not in r.stderr, r.stderr[-500:]
    for flag in ("-V", "--version"):
        r = subprocess.run(cli + [flag], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == f"unetsegment {__version__}", (flag, r.stdout, r.stderr)


# --------------------------------------------------------------------------------------------
# Item 2: every file a run writes gets 0666 & ~umask (mkstemp would make them 0600)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_output_file_gets_the_mode_of_the_umask(tmp_path, umask, mode):
    from dicom_utils import write_ct_series

    img, _ = ct_phantom(shape_kji=(10, 96, 96), spacing=(1.0, 1.0, 3.0))
    write_ct_series(img, tmp_path / "series")  # DICOM input: the run also writes segmentation.dcm
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        rc = main(["segment", str(tmp_path / "series"), "-o", str(out), "--model", "tiny-blob", "-q",
                   "--heatmap", "gradcam,uncertainty"])
    finally:
        os.umask(old)
    assert rc == 0
    written = sorted(os.listdir(out))
    # every contract file but the multi-class one (test_compartments checks its mode)
    assert written == sorted(set(CONTRACT_FILES) - {"class_probabilities.nrrd"}), "the run must write every contract file"
    modes = {f: oct((out / f).stat().st_mode & 0o777) for f in written}
    assert modes == {f: oct(mode) for f in written}


def test_sample_and_atomic_writers_share_the_umask_helper(tmp_path):
    from UNetSegmentLib.io.writers import atomic_path, new_shared_file

    old = os.umask(0o027)
    try:
        p = new_shared_file(tmp_path, ".x.", ".tmp")
        with atomic_path(tmp_path / "table.csv") as tmp:
            tmp.write_text("a\n")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640 and ((tmp_path / "table.csv").stat().st_mode & 0o777) == 0o640
    assert sorted(f.name for f in tmp_path.iterdir()) == [p.name, "table.csv"]  # no temporary left behind


# --------------------------------------------------------------------------------------------
# Item 7: progress on a terminal (bar with ETA, no rate) and in a log (one line per stage)
# --------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_prints_one_line_per_stage(ct_file, tmp_path, capsys):
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "out"), "--model", "tiny-blob"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    stages = [ln.split("] ", 1)[1] for ln in lines if ln.startswith("[")]
    assert stages == ["preprocess", "inference", "gradcam", "postprocess", "write"], lines
    elapsed = [float(ln[1:].split(" s]")[0]) for ln in lines if ln.startswith("[")]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "quiet"), "--model", "tiny-blob", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_bar_on_a_terminal_shows_the_eta_and_no_rate():
    term = _Terminal()
    prog = _Progress(True, stream=term)
    prog("inference", 0.0)
    prog("inference", 0.5, "ETA 12 s")
    shown = term.getvalue()
    prog("done", 1.0)
    prog.close()
    assert "ETA 12 s" in shown and "50%" in shown and "inference" in shown
    assert "/s" not in term.getvalue() and "write" in term.getvalue()


# --------------------------------------------------------------------------------------------
# Item 9: one resolved min_lesion_ml; dropped components explained; models list; -V
# --------------------------------------------------------------------------------------------
def test_summary_resolves_min_lesion_ml_once_and_explains_dropped_components(ct_file, tmp_path, capsys):
    from UNetSegmentLib.models.bundle import load_bundle

    default = resolve(None, load_bundle("tiny-blob"), hardware=False).min_lesion_ml
    out = tmp_path / "default"
    assert main(["segment", str(ct_file), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["parameters"]["min_lesion_ml"] == s["min_lesion_ml"] == float(default or 0.0)
    assert s["n_lesions"] >= 1 and s["dropped_small_lesions"]["count"] == 0
    capsys.readouterr()

    # a minimum above every component: "no lesion", with what was dropped, in all three outputs
    out = tmp_path / "big-minimum"
    assert main(["segment", str(ct_file), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none",
                 "--min-lesion-ml", "500"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    dropped = s["dropped_small_lesions"]
    assert s["n_lesions"] == 0 and s["parameters"]["min_lesion_ml"] == s["min_lesion_ml"] == 500.0
    assert dropped["count"] >= 1 and 0 < dropped["largest_ml"] <= dropped["total_ml"] < 500
    note = next(ln for ln in printed.splitlines() if ln.startswith("note: "))
    n = dropped["count"]
    assert f"{n} component" in note and "500 mL minimum" in note and f"{dropped['largest_ml']:.3g} mL" in note


def test_negative_report_names_the_dropped_components(tmp_path):
    import numpy as np

    from UNetSegmentLib.analysis.lesions import analyze_lesions
    from UNetSegmentLib.analysis.report import render_report

    img, mask = ct_phantom(shape_kji=(12, 48, 40))
    lab = img.with_array(mask.astype(np.uint8))
    prob = img.with_array(mask.astype(np.float32))
    table = analyze_lesions(lab, img, prob, {1: "blob"}, min_lesion_ml=1e6)
    assert table.n_lesions == 0 and len(table.dropped_ml) == 1
    lay = render_report(tmp_path / "r.png", image=img, labels=img.with_array(np.zeros_like(lab.array)), probability=prob,
                        gradcam=None, table=table, model_name="m", model_version="1", input_name="ct", created="now")
    assert lay.negative and "1 component under the 1e+06 mL minimum lesion size was dropped" in lay.dropped_note
    assert f"{table.dropped_ml[0]:.3g} mL" in lay.dropped_note


def test_models_list_shortens_titles_at_a_word_boundary(tmp_path, monkeypatch, capsys):
    title = "An extraordinarily long model title " + "with many descriptive words " * 6
    bundle = write_bundle(tmp_path / "long", extra_meta={"name": "long-title", "title": title})
    monkeypatch.setenv("UNETSEGMENT_MODELS", str(tmp_path / "user-models"))
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["models", "import", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("long-title"))
    shown = line[line.index("An extraordinarily"):]
    assert shown.endswith(" …") and title.startswith(shown[:-2] + " ")


# --------------------------------------------------------------------------------------------
# Item 11: lean install — the core segments without the extras; commands that need one say which
# --------------------------------------------------------------------------------------------
#: every module the extras bring (and their heavy dependencies): blocked as if not installed
_EXTRA_MODULES = sorted({m for mods in EXTRAS.values() for m in mods} | {"starlette", "multipart", "sklearn", "pandas"})
_BLOCK = "import sys\nfor m in {mods!r}:\n    sys.modules[m] = None  # import → ImportError, find_spec → None\n"


def test_core_segment_runs_with_every_extra_blocked(ct_file, tmp_path):
    out = tmp_path / "out"
    code = _BLOCK.format(mods=_EXTRA_MODULES) + (
        "from UNetSegmentLib.cli import main\n"
        f"rc = main(['segment', {str(ct_file)!r}, '-o', {str(out)!r}, '--model', 'tiny-blob', '-q'])\n"
        f"leaked = [m for m in {_EXTRA_MODULES!r} if sys.modules.get(m) is not None]\n"
        "assert not leaked, leaked\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert {"segmentation.seg.nrrd", "lesions.csv", "report.png", "summary.json"} <= set(os.listdir(out))


@pytest.mark.parametrize("extra,argv", [
    ("serve", ["serve"]),
    ("batch", ["batch", "cases", "-o", "cohort"]),
    ("train", ["train", "--config", "c.yaml", "-o", "bundle"]),
])
def test_a_command_without_its_extra_names_it_in_one_line(extra, argv, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for m in EXTRAS[extra]:
        monkeypatch.setitem(sys.modules, m, None)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"pip install 'unetsegment[{extra}]'" in err and f"unetsegment {argv[0]}" in err
    assert os.listdir(tmp_path) == []  # refused before doing anything


def test_extra_error_from_a_real_process_without_fastapi():
    code = _BLOCK.format(mods=["fastapi"]) + "from UNetSegmentLib.cli import main\nsys.exit(main(['serve']))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.strip() == ("unetsegment: error: `unetsegment serve` needs the optional 'serve' dependencies "
                                "(fastapi not installed) — pip install 'unetsegment[serve]'")


def test_pyproject_keeps_the_extras_out_of_the_core():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()  # noqa: E731
    core = {name(d) for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {"nilearn", "dask", "fastapi", "uvicorn", "python-multipart", "pyyaml", "pynrrd"}
    assert {name(d) for d in extras["train"]} == {"pyyaml", "nilearn"}
    assert {name(d) for d in extras["batch"]} == {"dask"} and "distributed" in extras["batch"][0]
    assert {name(d) for d in extras["serve"]} == {"fastapi", "uvicorn", "python-multipart"}
    assert extras["all"] == ["unetsegment[train,batch,serve]"]
    assert '-e ".[all,test]"' in (REPO / "Makefile").read_text()  # `make demo`/`make test` keep every command
    # pynrrd was declared but never imported by the package (slicerio brings it for .seg.nrrd)
    lib = REPO / "UNetSegment" / "UNetSegmentLib"
    assert not [p for p in lib.rglob("*.py") if "import nrrd" in p.read_text() or "from nrrd" in p.read_text()]
