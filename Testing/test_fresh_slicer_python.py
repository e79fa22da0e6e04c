"""The module's dependency check and install step against what a fresh 3D Slicer 5.10 ships.

* Without the packages Slicer does not ship (jsonschema, safetensors, ... poisoned in a subprocess)
  the panel's module imports, the check names what is missing and the models still list and load.
* The install plan pins Slicer's own packages and leaves highdicom out on 5.10 (with the reason).
* pip runs in a separate process whose lines arrive through :meth:`InstallProcess.poll`.
* ``test_fresh_slicer_510_install`` (slow) builds a venv holding only Slicer 5.10's Python packages
  (Python 3.12 where this machine has one, else this Python), fakes only the PyTorch extension's
  ``PyTorchUtils`` there, and runs the module's own check and install in it: the install resolves
  and leaves every Slicer-owned package as it was. Wheels are kept under ``.cache/fresh-slicer-5.10``
  and the install transcript is written to ``.cache/fresh-slicer-5.10/install-transcript.txt``.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_PARENT = REPO / "UNetSegment"
CACHE = REPO / ".cache" / "fresh-slicer-5.10"

#: what Slicer 5.10.0 puts in its Python: SuperBuild/External_python-*-requirements.cmake at tag v5.10.0
#: (hashes dropped; they are for the Python 3.12 wheels) and SimpleITK 2.5.2 (External_SimpleITK.cmake).
#: Slicer's VTK is its own build, not a pip distribution, so it is not here.
SLICER_510 = {
    "pip": "25.1.1", "setuptools": "80.9.0", "wheel": "0.45.1",
    "numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2",
    # python-dicom-requirements
    "pydicom": "2.4.4", "six": "1.17.0", "pillow": "11.2.1", "retrying": "1.3.4", "dicomweb-client": "0.60.0",
    # python-requests-requirements
    "certifi": "2025.4.26", "idna": "3.10", "charset-normalizer": "3.4.2", "urllib3": "2.4.0", "requests": "2.32.3",
    # python-pythonqt-requirements
    "packaging": "25.0", "pyparsing": "3.2.3",
    # python-extension-manager-requirements and -ssl-requirements
    "chardet": "5.2.0", "couchdb": "1.2", "gitdb": "4.0.12", "smmap": "5.0.2", "GitPython": "3.1.44",
    "cryptography": "45.0.3", "PyJWT": "2.10.1", "wrapt": "1.17.2", "Deprecated": "1.2.18", "pycparser": "2.22",
    "cffi": "1.17.1", "PyNaCl": "1.5.0", "python-dateutil": "2.9.0.post0", "typing_extensions": "4.14.0",
    "PyGithub": "2.6.1",
}
#: packages a fresh Slicer lacks that the module's worker needs (Resources/requirements.txt)
NOT_SHIPPED = ("jsonschema", "safetensors", "slicerio", "matplotlib", "tqdm", "highdicom")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# --- defect 1: the panel's code without the packages Slicer does not ship ---------------------------
POISON = """
import importlib.abc, importlib.metadata as md, json, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):  # as if not installed: import fails, metadata unknown
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
_version = md.version
def version(name):
    if name.lower() in BLOCKED:
        raise md.PackageNotFoundError(name)
    return _version(name)
md.version = version
"""


def test_panel_code_works_without_packages_slicer_does_not_ship():
    """Defect 1: no jsonschema (etc.): the check names what is missing; models list and load for the panel."""
    blocked = {"jsonschema", "safetensors", "slicerio", "matplotlib", "tqdm", "highdicom", "torch", "torchvision",
               "nrrd", "yaml", "PyTorchUtils"}
    code = POISON.format(blocked=blocked) + textwrap.dedent("""
        from UNetSegmentLib.slicer import install, widget  # the panel's module imports
        # what the self-test (UNetSegment.py: UNetSegmentTest) imports and builds before its run starts
        from UNetSegmentLib import params, phantom
        from UNetSegmentLib.io import outputs
        from UNetSegmentLib.slicer import logic as _logic, scene
        phantom.head_with_blob()
        from UNetSegmentLib.slicer.logic import SegmentationLogic
        from UNetSegmentLib.errors import UNetSegmentError
        report = install.check_dependencies()
        logic = SegmentationLogic(process_factory=lambda *a: None)
        try:
            logic.load_model("tiny-blob")
            direct = "loaded"
        except ModuleNotFoundError as e:
            direct = e.name
        models = {k: widget.load_panel_model(logic, k).channel_names for k in logic.available_models()}
        print(json.dumps({"missing": [m.name for m in report.missing], "skipped": [s.requirement for s in report.skipped],
                          "torch_ok": report.torch_ok, "text": report.text(), "models": models, "direct": direct,
                          "leaked": sorted(n for n in BLOCKED if n in sys.modules)}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(MODULE_PARENT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["direct"] == "jsonschema"  # the full check needs it: what killed the panel before
    assert got["missing"] == ["jsonschema", "safetensors", "slicerio", "matplotlib", "tqdm", "highdicom"]
    assert got["skipped"] == [] and got["torch_ok"] is False and "PyTorch extension" in got["text"]
    assert got["models"]["tiny-blob"] == ["CT"] and got["models"]["mr-perfusion-lesion"] == ["CBF", "CBV", "MTT", "Tmax"]
    assert set(got["models"]) >= {"tiny-blob", "ct-hemorrhage", "mr-perfusion-lesion"}
    assert got["leaked"] == []


# --- model.json checked without jsonschema ------------------------------------------------------------
def _mutations(meta: dict) -> list[tuple[str, dict]]:
    def edit(fn):
        m = copy.deepcopy(meta)
        fn(m)
        return m

    return [
        ("missing name", edit(lambda m: m.pop("name"))),
        ("bad name pattern", edit(lambda m: m.update(name="Bad Name"))),
        ("extra key", edit(lambda m: m.update(surprise=1))),
        ("schema_version const", edit(lambda m: m.update(schema_version=2))),
        ("dimensions enum", edit(lambda m: m.update(dimensions="4d"))),
        ("threshold exclusiveMaximum", edit(lambda m: m.update(threshold=1.0))),
        ("patch_size item type", edit(lambda m: m.update(patch_size=[16, 16.5]))),
        ("patch_size too long", edit(lambda m: m.update(patch_size=[16, 16, 16, 16]))),
        ("label color out of range", edit(lambda m: m["labels"][0].update(color=[1.5, 0, 0]))),
        ("no inputs", edit(lambda m: m.update(inputs=[]))),
        ("normalization fits no oneOf", edit(lambda m: m["inputs"][0].update(normalization={"type": "ct"}))),
        ("tta_axes not unique", edit(lambda m: m.setdefault("inference", {}).update(tta_axes=["i", "i"]))),
        ("weights sha256 pattern", edit(lambda m: m["weights"].update(sha256="xyz"))),
        ("bool is not an integer", edit(lambda m: m["labels"][0].update(value=True))),
        ("description minLength", edit(lambda m: m.update(description=""))),
        ("signature key pattern", edit(lambda m: m["inputs"][0].update(signature={"median": [0, 1]}))),
        ("signature value type", edit(lambda m: m["inputs"][0].update(signature={"p50": [0, "high"]}))),
    ]


@pytest.mark.parametrize("model", ["tiny-blob", "ct-hemorrhage", "mr-perfusion-lesion"])
def test_schema_check_without_jsonschema_agrees_with_jsonschema(model):
    import jsonschema

    from UNetSegmentLib.models.bundle import SCHEMA_PATH
    from UNetSegmentLib.slicer.install import schema_errors

    schema = json.loads(SCHEMA_PATH.read_text())
    meta = json.loads((REPO / "Resources" / "Models" / model / "model.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert schema_errors(meta, schema) == [] and not list(validator.iter_errors(meta))
    for what, bad in _mutations(meta):
        assert list(validator.iter_errors(bad)), f"jsonschema accepts {what}: fix the mutation"
        assert schema_errors(bad, schema), f"the check without jsonschema accepts {what}"


def test_schema_check_refuses_keywords_it_does_not_know():
    from UNetSegmentLib.slicer.install import schema_errors

    with pytest.raises(ValueError, match="not supported without jsonschema"):
        schema_errors({}, {"type": "object", "propertyNames": {"pattern": "^a"}})


def test_preview_bundle_reports_a_broken_model_json(tmp_path):
    from UNetSegmentLib.errors import ModelError
    from UNetSegmentLib.slicer.install import preview_bundle

    shutil.copytree(REPO / "Resources" / "Models" / "tiny-blob", tmp_path / "m")
    mj = tmp_path / "m" / "model.json"
    meta = json.loads(mj.read_text())
    meta["threshold"] = 2
    mj.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="threshold"):
        preview_bundle(tmp_path / "m")


# --- defect 3: the install plan ------------------------------------------------------------------------
def _versions(table: dict[str, str]):
    import importlib.metadata as md

    def version_of(name: str) -> str:
        for k, v in table.items():
            if _norm(k) == _norm(name):
                return v
        raise md.PackageNotFoundError(name)

    return version_of


SLICER_512 = {**SLICER_510, "numpy": "2.4.6", "pydicom": "3.0.2", "highdicom": "0.27.0", "pillow": "12.2.0"}


def test_install_plan_on_slicer_510_pins_its_packages_and_leaves_highdicom_out():
    from UNetSegmentLib.slicer import install

    version_of = _versions(SLICER_510)
    report = install.check_dependencies(version_of=version_of, torch_ok=False)
    assert [m.name for m in report.to_install] == ["jsonschema", "safetensors", "slicerio", "matplotlib", "tqdm"]
    assert report.blocked == []
    (skip,) = report.skipped
    assert skip.requirement.startswith("highdicom") and "pydicom 2.4.4" in skip.reason and "DICOM SEG" in skip.reason
    pins = install.constraints_for_slicer_packages(version_of).split()
    assert {"numpy==2.0.2", "scipy==1.13.1", "SimpleITK==2.5.2", "pydicom==2.4.4", "requests==2.32.3",
            "pillow==11.2.1", "packaging==25.0"} == set(pins)  # no vtk pin: Slicer's VTK is no pip distribution


def test_install_plan_on_slicer_512_treats_its_highdicom_as_slicer_owned():
    from UNetSegmentLib.slicer import install

    version_of = _versions(SLICER_512)
    report = install.check_dependencies(version_of=version_of, torch_ok=True)
    assert report.skipped == [] and "highdicom" not in [m.name for m in report.missing]
    assert "highdicom==0.27.0" in install.constraints_for_slicer_packages(version_of).split()
    assert "pydicom==3.0.2" in install.constraints_for_slicer_packages(version_of).split()


def test_a_too_old_slicer_package_is_a_clear_error_not_an_install():
    from UNetSegmentLib.slicer import install

    report = install.check_dependencies(version_of=_versions({**SLICER_510, "numpy": "1.19.0"}), torch_ok=True)
    assert [m.name for m in report.blocked] == ["numpy"] and "numpy>=1.24 (have 1.19.0)" in report.text()


def test_dicom_seg_writer_says_why_when_highdicom_is_missing(monkeypatch):
    import importlib.metadata as md

    from UNetSegmentLib.io import dicom_seg

    real = md.version
    monkeypatch.setattr(md, "version", lambda n: (_ for _ in ()).throw(md.PackageNotFoundError(n)) if n == "highdicom" else real(n))
    reason = dicom_seg.unavailable_reason()
    assert reason and "highdicom is not installed" in reason and "5.12" in reason
    monkeypatch.setattr(md, "version", lambda n: "0.22.0" if n == "highdicom" else real(n))
    assert "highdicom 0.22.0 is older than 0.27" in dicom_seg.unavailable_reason()
    monkeypatch.setattr(md, "version", real)
    assert dicom_seg.unavailable_reason() is None  # the test venv has highdicom >= 0.27


# --- the install runs in its own process; lines arrive through poll() -----------------------------------
def test_installer_runs_pip_in_a_separate_process_and_streams_its_lines(tmp_path):
    from UNetSegmentLib.slicer import install

    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text("import os, sys\nprint('pid', os.getpid(), flush=True)\nprint('args', *sys.argv[1:], flush=True)\n"
                        "print('Successfully installed slicerio-1.4.0', flush=True)\n")
    commands: list[list[str]] = []

    def launch(command):  # the real launcher, with python -m pip swapped for the fake
        commands.append(command)
        return install._launch([sys.executable, str(fake_pip), *command[3:]])

    installer = install.DependencyInstaller()
    lines, ends = [], []
    installer.log.connect(lambda level, line: lines.append(line))
    installer.finished.connect(ends.append)
    report = install.check_dependencies(["slicerio>=1.4", "definitely-not-installed-pkg>=1"], torch_ok=True)
    proc = installer.start(report, python="/opt/Slicer/bin/PythonSlicer", use_timer=False, launch=launch,
                           recheck=lambda: install.DependencyReport())
    assert installer.is_running()
    assert proc.wait() == 0 and not installer.is_running()
    (cmd,) = commands
    assert cmd[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "pip", "install"]
    assert cmd[cmd.index("-c") + 1] == str(installer.constraints) and cmd[-1] == "definitely-not-installed-pkg>=1"
    pid = int(next(line for line in lines if line.startswith("pid ")).split()[1])
    assert pid != os.getpid() and "Successfully installed slicerio-1.4.0" in lines
    assert len(ends) == 1 and ends[0].ok
    assert f"numpy=={__import__('numpy').__version__}" in installer.constraints_text
    assert not installer.constraints.exists()  # the temporary constraints file is gone


def test_ensure_dependencies_asks_first_and_never_installs_when_declined(monkeypatch):
    from UNetSegmentLib.slicer import install

    monkeypatch.setattr(install, "check_dependencies",
                        lambda *a, **k: install.DependencyReport(missing=[install.Missing("slicerio>=1.4", "slicerio", None, False)]))
    installer = install.DependencyInstaller()
    started = []
    monkeypatch.setattr(installer, "start", lambda *a, **k: started.append(a))
    asked = []
    assert install.ensure_dependencies(confirm=lambda text, details: asked.append(details) or False, installer=installer) is False
    assert asked == ["slicerio>=1.4"] and started == []
    assert install.ensure_dependencies(confirm=lambda *a: True, installer=installer) is False  # started, not done yet
    assert len(started) == 1


# --- a fresh Slicer 5.10 Python, modelled ----------------------------------------------------------------
FAKE_PYTORCHUTILS = '''"""Test fake of the PyTorch extension's PyTorchUtils (this venv only): torch is never installed."""
import json, os

CALLS = os.environ["FAKE_PYTORCHUTILS_CALLS"]


class PyTorchUtilsLogic:
    @staticmethod
    def torchInstalled():
        return False

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        with open(CALLS, "a") as f:
            f.write(json.dumps({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement}) + "\\n")
        return object()  # what the real one returns is the torch module; nothing is installed here
'''

DRIVER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])  # Slicer's module path: the folder holding UNetSegmentLib
out = open(sys.argv[2], "w")
from UNetSegmentLib.slicer import install, widget
from UNetSegmentLib.slicer.logic import SegmentationLogic
from UNetSegmentLib.io.dicom_seg import unavailable_reason

def dump(tag, report):
    print(json.dumps({tag: {"missing": [m.requirement for m in report.missing], "blocked": [m.name for m in report.blocked],
                            "skipped": [[s.requirement, s.reason] for s in report.skipped], "torch_ok": report.torch_ok}}))

before = install.check_dependencies()
dump("before", before)
logic = SegmentationLogic(process_factory=lambda *a: None)
print(json.dumps({"models": {k: widget.load_panel_model(logic, k).name for k in logic.available_models()}}))
install.INSTALLER.log.connect(lambda level, line: out.write(f"[{level}] {line}\n"))
ends = []
install.INSTALLER.finished.connect(ends.append)
ready = install.ensure_dependencies(confirm=lambda text, details: out.write(f"[asked] {text}\n[details] {details}\n") or True,
                                    use_timer=False)
out.write("[command] " + " ".join(install.INSTALLER.process.command) + "\n")
out.write("[constraints]\n" + install.INSTALLER.constraints_text)
code = install.INSTALLER.process.wait()
out.write(f"[pip exit code] {code}\n")
print(json.dumps({"ready_at_once": ready, "pip_code": code, "finished": len(ends)}))
dump("after", install.check_dependencies())
print(json.dumps({"dicom_seg": unavailable_reason()}))
'''


def _python_312() -> tuple[str, str]:
    """A Python 3.12 (Slicer 5.10's) if this machine has one that runs, else this interpreter."""
    candidates = [shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for c in filter(None, candidates):
        r = subprocess.run([c, "-c", "import sys, venv, ensurepip; print(sys.version.split()[0])"], capture_output=True, text=True)
        if r.returncode == 0:
            return c, r.stdout.strip()
    return sys.executable, sys.version.split()[0] + " (no working Python 3.12 here; Slicer 5.10 has 3.12.10)"


def _freeze(python: Path) -> dict[str, str]:
    r = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                       capture_output=True, text=True, check=True)
    return {_norm(p["name"]): p["version"] for p in json.loads(r.stdout)}


def _run(cmd: list[str], log, **kw) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    log.write(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n")
    assert r.returncode == 0, f"{' '.join(cmd[:5])}… failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_fresh_slicer_510_install(tmp_path, capsys):
    t0 = time.monotonic()
    python, version = _python_312()
    tag = "py" + version.split()[0].rsplit(".", 1)[0].replace(".", "")
    wheels = CACHE / f"wheels-{tag}"
    pins = [f"{k}=={v}" for k, v in SLICER_510.items()]
    CACHE.mkdir(parents=True, exist_ok=True)
    setup_log = open(CACHE / "setup-log.txt", "w")
    stamp = wheels / ".complete"
    if not stamp.is_file() or stamp.read_text() != "\n".join(pins):
        _run([python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheels), *pins], setup_log)
        stamp.write_text("\n".join(pins))
    venv = tmp_path / "slicer-5.10-python"
    _run([python, "-m", "venv", "--without-pip", str(venv)], setup_log)
    vpy = venv / "bin" / "python"
    _run([python, "-m", "pip", "--python", str(vpy), "install", "--no-index", "--no-deps", "--find-links", str(wheels),
          "--disable-pip-version-check", "-q", *pins], setup_log)
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "PyTorchUtils.py").write_text(FAKE_PYTORCHUTILS)
    shipped = _freeze(vpy)
    assert {k: shipped.get(_norm(k)) for k in SLICER_510} == {k: v for k, v in SLICER_510.items()}
    t_setup = time.monotonic() - t0

    calls = tmp_path / "pytorchutils-calls.jsonl"
    transcript = CACHE / "install-transcript.txt"
    pip_lines = tmp_path / "pip-lines.txt"
    env = {**os.environ, "FAKE_PYTORCHUTILS_CALLS": str(calls), "PIP_CACHE_DIR": str(CACHE / "pip-cache"),
           "PYTHONNOUSERSITE": "1"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "PythonSlicer").exists())  # pip goes into this venv's Python
    env.pop("PYTHONPATH", None)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([str(vpy), str(driver), str(MODULE_PARENT), str(pip_lines)], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=900)
    after = _freeze(vpy)
    t_total = time.monotonic() - t0
    events = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            events.update(json.loads(line))
    changed = {k: (v, after.get(k)) for k, v in shipped.items() if after.get(k) != v}
    added = sorted(f"{k}=={v}" for k, v in after.items() if k not in shipped)
    transcript.write_text(
        f"Fresh 3D Slicer 5.10 Python, modelled (Testing/test_fresh_slicer_python.py)\n"
        f"Python: {python} {version}\nSlicer 5.10 packages: {' '.join(pins)}\n"
        f"Fake PyTorchUtils (this venv only): torchInstalled() False; installTorch calls: "
        f"{calls.read_text().strip() if calls.exists() else 'none'}\n\n"
        f"Dependency check before: {json.dumps(events.get('before'))}\n"
        f"Models for the panel before the install: {json.dumps(events.get('models'))}\n\n"
        + (pip_lines.read_text() if pip_lines.exists() else "")
        + f"\nDependency check after: {json.dumps(events.get('after'))}\n"
        f"DICOM SEG: {events.get('dicom_seg')}\n"
        f"Slicer's packages changed by the install: {changed or 'none'}\nAdded: {' '.join(added)}\n"
        f"Driver exit code {r.returncode}; stderr:\n{r.stderr[-4000:]}\n"
        f"Timing: venv setup {t_setup:.0f} s, total {t_total:.0f} s\n")
    with capsys.disabled():
        print(f"\nfresh Slicer 5.10 Python: {python} ({version}); setup {t_setup:.0f} s, total {t_total:.0f} s; "
              f"transcript: {transcript}")
    assert r.returncode == 0, r.stderr[-4000:]

    before = events["before"]
    assert before["missing"] == ["jsonschema>=4", "safetensors>=0.4", "slicerio>=1.4", "matplotlib>=3.7", "tqdm>=4.60"]
    assert before["blocked"] == [] and before["torch_ok"] is False
    ((skipped_req, reason),) = before["skipped"]
    assert skipped_req.startswith("highdicom") and "pydicom 2.4.4" in reason
    assert set(events["models"]) >= {"tiny-blob", "ct-hemorrhage", "mr-perfusion-lesion"}
    assert [json.loads(x) for x in calls.read_text().splitlines()] == [{"askConfirmation": False, "torchVersionRequirement": ">=2.2"}]
    assert events["ready_at_once"] is False and events["pip_code"] == 0 and events["finished"] == 1
    assert events["after"]["missing"] == [] and events["after"]["torch_ok"] is False  # torch: the fake installs nothing
    assert changed == {}, f"the install changed Slicer's own packages: {changed}"
    assert after["pydicom"] == "2.4.4" and after["numpy"] == "2.0.2"
    assert not {"torch", "vtk", "highdicom"} & set(after), "torch, a PyPI vtk or highdicom got installed"
    assert {"jsonschema", "safetensors", "slicerio", "matplotlib", "tqdm"} <= set(after)
    assert "highdicom is not installed" in events["dicom_seg"]


def test_summary_says_why_there_is_no_dicom_seg_where_highdicom_cannot_be_installed(tmp_path, monkeypatch):
    """Defect 3 (Slicer 5.10): a DICOM run without highdicom still writes everything else; summary.json says why."""
    import importlib.metadata as md

    from conftest import ct_phantom
    from dicom_utils import write_ct_series
    from UNetSegmentLib.cli import main

    real = md.version

    def version(name: str) -> str:
        if _norm(name) == "highdicom":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    img, _ = ct_phantom(shape_kji=(10, 96, 96), spacing=(1.0, 1.0, 3.0))
    write_ct_series(img, tmp_path / "series")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "series"), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_lesions"] >= 1 and not (out / "segmentation.dcm").exists()
    assert summary["dicom_seg"]["file"] is None and "highdicom is not installed" in summary["dicom_seg"]["absent_because"]
    assert (out / "segmentation.seg.nrrd").is_file() and (out / "lesions.csv").is_file()
