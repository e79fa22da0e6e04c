"""Extension packaging: CMake/s4ext/ExtensionsIndex metadata agree, every file is listed, and the
packaged layout (built with a stand-in Slicer CMake config) finds its resources as the source tree does."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "UNetSegment"
LIB = MODULE_DIR / "UNetSegmentLib"


def cmake_sets(text: str) -> dict[str, list[str]]:
    """``set(NAME values...)`` → {NAME: [values]} (comments stripped, quoted strings kept whole)."""
    text = re.sub(r"#[^\n]*", "", text)
    out = {}
    for m in re.finditer(r'\bset\(\s*([A-Za-z_]+)((?:\s+(?:"[^"]*"|[^\s()"]+))*)\s*\)', text):
        out[m.group(1)] = [a.strip('"') for a in re.findall(r'"[^"]*"|[^\s]+', m.group(2))]
    return out


def extension_meta() -> dict[str, str]:
    sets = cmake_sets((REPO / "CMakeLists.txt").read_text())
    return {k: " ".join(v) for k, v in sets.items() if k.startswith("EXTENSION_")}


def s4ext() -> dict[str, str]:
    out = {}
    for line in (REPO / "UNetSegment.s4ext").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def module_lists() -> tuple[list[str], list[str]]:
    sets = cmake_sets((MODULE_DIR / "CMakeLists.txt").read_text())
    name = sets["MODULE_NAME"][0]
    expand = lambda xs: [x.replace("${MODULE_NAME}", name) for x in xs]  # noqa: E731
    return expand(sets["MODULE_PYTHON_SCRIPTS"]), expand(sets["MODULE_PYTHON_RESOURCES"])


def test_top_level_cmake_declares_the_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    meta = extension_meta()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key), key
    assert meta["EXTENSION_DEPENDS"] == "PyTorch" and meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert "5.10" in meta["EXTENSION_DESCRIPTION"]
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(UNetSegment)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(UNetSegment)") < text.index("CPACK")


def test_s4ext_and_index_json_match_cmake():
    meta, s4, entry = extension_meta(), s4ext(), json.loads((REPO / "UNetSegment.json").read_text())
    for key in ("scm", "scmurl", "scmrevision", "homepage", "category"):
        assert s4.get(key), f"s4ext lacks required key {key}"
    assert s4["scm"] == "git" and "&" not in s4["scmurl"] and "&" not in s4["iconurl"]
    assert s4["category"] == meta["EXTENSION_CATEGORY"] == entry["category"]
    assert s4["depends"].split() == meta["EXTENSION_DEPENDS"].split() == entry["build_dependencies"]
    assert s4["homepage"] == meta["EXTENSION_HOMEPAGE"]
    assert s4["description"] == meta["EXTENSION_DESCRIPTION"] and s4["iconurl"] == meta["EXTENSION_ICONURL"]
    assert s4["contributors"] == meta["EXTENSION_CONTRIBUTORS"]
    assert s4["build_subdirectory"] == meta["EXTENSION_BUILD_SUBDIRECTORY"] == entry["build_subdirectory"]
    assert s4["scmurl"].removesuffix(".git") == entry["scm_url"].removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
               "enabled", "tier", "dicom_support_rule"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert 1 <= entry["tier"] <= 5 and entry["scm_revision"] == s4["scmrevision"]
    assert not Path(entry["scm_url"]).stem.startswith("Slicer") or Path(entry["scm_url"]).stem == "SlicerUNetSegment"


def test_every_python_file_and_resource_is_listed_and_exists():
    scripts, resources = module_lists()
    on_disk_py = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py")
                        if "__pycache__" not in p.parts and ".egg-info" not in str(p))
    assert sorted(scripts) == on_disk_py, "MODULE_PYTHON_SCRIPTS differs from the .py files in UNetSegment/"
    lib_data = sorted(str(p.relative_to(MODULE_DIR)) for p in LIB.rglob("*")
                      if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)
    top = sorted("../" + str(p.relative_to(REPO)) for p in (REPO / "Resources").rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(REPO).parts))  # not .training/
    assert sorted(resources) == sorted(lib_data + top), "MODULE_PYTHON_RESOURCES differs from the resource files"
    for f in scripts + resources:
        assert (MODULE_DIR / f).is_file(), f
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_test_standin_lives_outside_the_module_folder():
    assert not any("standin" in p.name for p in MODULE_DIR.rglob("*"))
    assert (REPO / "Testing" / "slicer_standin" / "__init__.py").is_file()


#: pyproject dependencies the Slicer module does not install, and why
NOT_NEEDED_IN_SLICER = {
    "torch": "comes through the PyTorch extension",
    "dask": "batch runs on a cluster (unetsegment batch), not used by the module",
    "fastapi": "inference server only", "uvicorn": "inference server only", "python-multipart": "inference server only",
    "psutil": "server/batch resource checks only",
    "nilearn": "training backgrounds (UNetSegmentLib.models.training) only",
    "pydicom": "Slicer ships it (and pins it): never installed or upgraded by the module",
}


def test_license_requirements_and_icon():
    assert "Apache License" in (REPO / "LICENSE.txt").read_text() and "Version 2.0, January 2004" in (REPO / "LICENSE.txt").read_text()
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "Apache-2.0" in json.dumps(py["license"])
    from UNetSegmentLib.slicer.install import read_requirements

    name = lambda req: re.split(r"[<>=\[ ]", req, 1)[0].lower()  # noqa: E731
    inside_slicer = read_requirements()
    assert set(inside_slicer) <= set(py["dependencies"]), "Resources/requirements.txt must use pyproject's specifiers"
    left_out = {name(d) for d in py["dependencies"]} - {name(r) for r in inside_slicer}
    assert left_out <= set(NOT_NEEDED_IN_SLICER), (
        f"new dependencies {sorted(left_out - set(NOT_NEEDED_IN_SLICER))}: add them to Resources/requirements.txt "
        "if the Slicer module's worker needs them, else to NOT_NEEDED_IN_SLICER here")
    png = (REPO / "Resources" / "Icons" / "UNetSegment.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (128, 128)


def test_core_never_imports_slicer_qt_vtk_or_the_adapters():
    bad = []
    for p in LIB.rglob("*.py"):
        if "slicer" in p.relative_to(LIB).parts[:1]:
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for n in names:
                if n.split(".")[0] in ("slicer", "qt", "ctk", "vtk") or n.lstrip(".").split(".")[0] == "slicer":
                    bad.append(f"{p.relative_to(LIB)}: {n}")
    assert not bad, bad


def test_resources_resolve_in_the_source_tree():
    from UNetSegmentLib.models.bundle import bundled_models_dir
    from UNetSegmentLib.resources import resources_dir

    assert resources_dir() == REPO / "Resources" and bundled_models_dir() == REPO / "Resources" / "Models"


FAKE_SLICER_USE = r"""
# Stand-in for Slicer's CMake: the directory variables UseSlicer.cmake sets for an extension and the
# file handling of slicerMacroBuildScriptedModule and ctkMacroCompilePythonScript (copy SCRIPTS and
# RESOURCES to <build>/<qt-scripted-modules>/<path as given>, then install that folder's content to
# Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR), without compiling anything.
set(Slicer_LIB_DIR "lib/Slicer-5.10")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_LIB_DIR}/qt-scripted-modules")
set(Slicer_INSTALL_ROOT "@INSTALL_ROOT@")
set(Slicer_BUNDLE_EXTENSIONS_LOCATION "@BUNDLE_EXTENSIONS_LOCATION@")
set(Slicer_INSTALL_LIB_DIR "${Slicer_INSTALL_ROOT}${Slicer_LIB_DIR}")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR
    "${Slicer_INSTALL_ROOT}${Slicer_BUNDLE_EXTENSIONS_LOCATION}${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  set(_dest ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  foreach(_f ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_f}'")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${_f} ${_dest}/${_f} COPYONLY)
  endforeach()
  install(DIRECTORY "${_dest}/" DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" USE_SOURCE_PERMISSIONS)
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${MY_SCRIPT}\n")
endmacro()
"""

#: (Slicer_INSTALL_ROOT, Slicer_BUNDLE_EXTENSIONS_LOCATION) as Slicer sets them for an extension: Linux and
#: Windows install into the extension's own tree; macOS relocates only the module folders into the bundle
#: (UseSlicer.cmake.in, SlicerDirectories.cmake), Slicer_INSTALL_LIB_DIR stays Slicer.app/Contents/lib/Slicer-X.Y
LAYOUTS = {
    "linux": ("./", ""),
    "macos": ("Slicer.app/Contents/", "Extensions-33216/UNetSegment/"),
}


def ensure_cmake() -> str:
    """cmake on PATH, else the PyPI ``cmake`` wheel's (``pip install cmake``); a clear failure otherwise."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # the PyPI wheel

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        pytest.fail("cmake is needed to package the extension: install it (apt-get install cmake, or pip install cmake)")


def install_extension(tmp_path: Path, layout: str) -> Path:
    """Configure and install the extension with the stand-in Slicer config; the install prefix."""
    cmake = ensure_cmake()
    root, bundle = LAYOUTS[layout]
    sdir = tmp_path / "fake-slicer"
    sdir.mkdir()
    (sdir / "UseSlicer.cmake").write_text(FAKE_SLICER_USE.replace("@INSTALL_ROOT@", root)
                                          .replace("@BUNDLE_EXTENSIONS_LOCATION@", bundle))
    (sdir / "empty.cmake").write_text("")
    (sdir / "SlicerConfig.cmake").write_text(
        f'set(Slicer_USE_FILE "{sdir}/UseSlicer.cmake")\n'
        f'set(Slicer_EXTENSION_GENERATE_CONFIG "{sdir}/empty.cmake")\nset(Slicer_EXTENSION_CPACK "{sdir}/empty.cmake")\n')
    build, prefix = tmp_path / "build", tmp_path / "install"
    subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={sdir}", f"-DCMAKE_INSTALL_PREFIX={prefix}"],
                   check=True, capture_output=True, text=True)
    subprocess.run([cmake, "--install", str(build)], check=True, capture_output=True, text=True)
    assert (build / "unittests.txt").read_text().split() == ["UNetSegment.py"]
    return prefix


def slicer_resource_path(module_file: Path, filename: str) -> Path:
    """Slicer 5.10's ``ScriptedLoadableModuleWidget.resourcePath`` (Base/Python/slicer/ScriptedLoadableModule.py):
    ``os.path.join(os.path.dirname(modulePath), "Resources", filename)``; "Edit UI" shows when it is a file."""
    return Path(os.path.join(os.path.dirname(module_file), "Resources", filename))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packaged_layout_finds_resources_and_loads_ui_and_models(tmp_path, layout):
    """Defects 2 and 11: resources install beside the module in every layout; UI and models load from there."""
    prefix = install_extension(tmp_path, layout)
    root, bundle = LAYOUTS[layout]
    mods = (prefix / root / bundle / "lib/Slicer-5.10/qt-scripted-modules").resolve()
    res = mods / "Resources"
    scripts, resources = module_lists()
    for f in scripts:
        assert (mods / f).is_file(), f
    for f in resources:
        assert ((res / f[len("../Resources/"):]) if f.startswith("../Resources/") else (mods / f)).is_file(), f
    if bundle:  # macOS: Slicer_INSTALL_LIB_DIR is Slicer's own lib folder, not the extension's
        assert not (prefix / root / "lib").exists(), "something was installed under Slicer_INSTALL_LIB_DIR, outside the extension"
    assert slicer_resource_path(mods / "UNetSegment.py", "UI/UNetSegment.ui").is_file()  # developer mode "Edit UI"
    code = ("import sys, json, xml.etree.ElementTree as ET; sys.path.insert(0, sys.argv[1]);"
            "from UNetSegmentLib.resources import resources_dir, resource_path;"
            "from UNetSegmentLib.models.bundle import available_models, load_bundle;"
            "ui = ET.parse(resource_path('UI', 'UNetSegment.ui')).getroot();"
            "b = load_bundle('tiny-blob');"
            "print(json.dumps([str(resources_dir()), ui.find('class').text, str(b.root), sorted(available_models()),"
            " resource_path('Icons', 'UNetSegment.png').is_file(), resource_path('requirements.txt').is_file()]))")
    env = {**os.environ, "UNETSEGMENT_MODELS": str(tmp_path / "no-user-models")}
    out = subprocess.run([sys.executable, "-c", code, str(mods)], check=True, capture_output=True, text=True,
                         cwd=str(tmp_path), env=env).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == [str(res), "UNetSegment", str(res / "Models" / "tiny-blob"),
                   ["ct-hemorrhage", "ct-hemorrhage-compartments", "mr-perfusion-lesion", "tiny-blob"], True, True]


def test_resources_resolve_beside_the_module_first(tmp_path):
    """A packaged tree wins over a stray ../Resources; a Resources folder without our UI file is skipped."""
    from UNetSegmentLib import resources

    mod = tmp_path / "qt-scripted-modules"
    (mod / "Resources" / "UI").mkdir(parents=True)
    (tmp_path / "Resources" / "UI").mkdir(parents=True)
    (tmp_path / "Resources" / "UI" / "UNetSegment.ui").write_text("<ui/>")
    assert resources.resource_candidates(mod) == (mod / "Resources", tmp_path / "Resources")
    first = next(c for c in resources.resource_candidates(mod) if c.joinpath(*resources.MARKER).is_file())
    assert first == tmp_path / "Resources"
    (mod / "Resources" / "UI" / "UNetSegment.ui").write_text("<ui/>")
    first = next(c for c in resources.resource_candidates(mod) if c.joinpath(*resources.MARKER).is_file())
    assert first == mod / "Resources"


# --- defect 9: every URL the extension index fetches points at a file of this repository ------------------
def _raw_url_to_path(url: str) -> Path:
    m = re.match(r"^https://raw\.githubusercontent\.com/unetsegment/SlicerUNetSegment/main/(.+)$", url)
    assert m, f"{url} is not a raw.githubusercontent.com URL of this repository's main branch"
    return REPO / m.group(1)


def test_icon_and_screenshot_urls_point_to_files_in_the_repository():
    meta, s4 = extension_meta(), s4ext()
    urls = {"EXTENSION_ICONURL": meta["EXTENSION_ICONURL"].split(), "EXTENSION_SCREENSHOTURLS": meta["EXTENSION_SCREENSHOTURLS"].split(),
            "s4ext iconurl": s4["iconurl"].split(), "s4ext screenshoturls": s4["screenshoturls"].split()}
    index = json.loads((REPO / "UNetSegment.json").read_text())
    urls["UNetSegment.json"] = [v for k, v in index.items() if k.endswith("url") and k != "scm_url"]
    assert urls["EXTENSION_SCREENSHOTURLS"] and s4["screenshoturls"].split() == urls["EXTENSION_SCREENSHOTURLS"]
    for where, values in urls.items():
        for url in values:
            path = _raw_url_to_path(url)
            assert path.is_file(), f"{where}: {url} -> {path.relative_to(REPO)} is not in the repository"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{where}: {url} is not a PNG"
