"""Model bundles: a folder (or zip) holding ``model.json`` + weights (+ ``MODEL_CARD.md``).

Loading validates ``model.json`` against the shipped JSON Schema, checks the weights' sha256, and
loads tensors with ``safetensors`` or ``torch.load(weights_only=True)`` — never arbitrary pickles.
Every problem becomes a :class:`ModelError` saying exactly what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelError

SCHEMA_PATH = Path(__file__).with_name("schemas") / "model.schema.json"
#: models looked up by name, in this order: user-imported, then bundled with the extension
DEFAULT_MODEL_PREFERENCE = ("ct-hemorrhage", "tiny-blob")
#: the largest network a model.json may declare (800 MB of fp32 weights; the shipped models have ~2 million)
MAX_PARAMETERS = 200_000_000
#: the most activation memory one patch may need at inference (fp32, batch 1; see :func:`patch_activation_bytes`)
MAX_PATCH_ACTIVATION_BYTES = 8 << 30


def bundled_models_dir() -> Path:
    """``Resources/Models`` of the source tree or of the packaged extension (see :mod:`.resources`)."""
    from ..resources import resource_path

    return resource_path("Models")


def user_models_dir() -> Path:
    env = os.environ.get("UNETSEGMENT_MODELS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "unetsegment" / "models"


@dataclass(frozen=True)
class Bundle:
    """A validated model bundle. ``meta`` is the parsed ``model.json``."""

    root: Path
    meta: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def channel_names(self) -> list[str]:
        return [c["name"] for c in self.meta["inputs"]]

    @property
    def labels(self) -> list[dict]:
        return self.meta["labels"]

    @property
    def dimensions(self) -> str:
        return self.meta["dimensions"]

    @property
    def weights_path(self) -> Path:
        return self.root / self.meta["weights"]["file"]

    def build_network(self):
        """The network with its weights loaded (CPU, eval mode)."""
        from .networks import build_network

        arch = self.meta["architecture"]
        check_architecture_budget(self.meta, f"model {self.name}")  # before a byte of it is allocated
        try:
            net = build_network(arch["name"], **arch["kwargs"])
        except (ValueError, TypeError) as e:
            raise ModelError(f"model {self.name}: cannot build architecture {arch['name']!r}: {e}", "check 'architecture' in model.json") from None
        state = load_weights(self.weights_path)
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            detail = []
            if missing:
                detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if bad:
                k = bad[0]
                detail.append(f"{len(bad)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
            raise ModelError(
                f"model {self.name}: weights do not match the architecture: {'; '.join(detail)}",
                "use the weights file trained for this model.json",
            )
        net.load_state_dict(state)
        return net.eval()


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_meta(meta: Any, where: str = "model.json") -> None:
    """Raise :class:`ModelError` naming the first schema violation and the cross-field problems."""
    import jsonschema

    v = jsonschema.Draft202012Validator(_schema())
    errors = sorted(v.iter_errors(meta), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        loc = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ModelError(f"{where} is invalid at {loc}: {e.message}", "fix model.json to match the bundle schema (see docs)")
    dims = meta["dimensions"]
    patch = meta["patch_size"]
    if len(patch) != (3 if dims == "3d" else 2):
        raise ModelError(f"{where}: patch_size {patch} does not fit a {dims} model", f"give {3 if dims == '3d' else 2} values")
    depth = int(meta["architecture"]["kwargs"].get("depth", 4))
    if any(p % (2**depth) for p in patch):
        raise ModelError(f"{where}: patch_size {patch} is not divisible by 2**depth = {2**depth}", "use a multiple of it")
    values = [l["value"] for l in meta["labels"]]
    if len(set(values)) != len(values):
        raise ModelError(f"{where}: duplicate label values {values}", "give each label its own value")
    if not any(l.get("lesion", True) for l in meta["labels"]):
        raise ModelError(f"{where}: every label says \"lesion\": false, so the model would find nothing",
                         "mark the finding's label(s) as lesions (leave \"lesion\" out or set it true)")
    from .terminology import check_label_codes

    check_label_codes(meta, where)
    names = [c["name"] for c in meta["inputs"]]
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: duplicate input channel names {names}", "name each channel once")
    shown = meta.get("display", {}).get("channel")
    if shown is not None and shown not in names:
        raise ModelError(f"{where}: display.channel {shown!r} is not an input channel ({', '.join(names)})",
                         "name one of the inputs, or leave it out (the first input is shown)")
    arch = meta["architecture"]
    if arch["name"] == "multipath_unet" and len(names) > 1:
        paths = arch["kwargs"].get("paths", arch["kwargs"].get("in_channels"))
        if paths != len(names):  # one encoder per modality: with 2.5D context, a path holds a modality's slices
            raise ModelError(f"{where}: multipath_unet has {paths} paths for {len(names)} input channels",
                             f"set architecture.kwargs.paths to {len(names)} (one encoder per modality)")


def check_architecture_budget(meta: dict, where: str = "model.json") -> int:
    """Refuse (:class:`ModelError`) a network beyond :data:`MAX_PARAMETERS` or :data:`MAX_PATCH_ACTIVATION_BYTES`;
    return its parameter count. The count is exact and free: the network is built on PyTorch's ``meta``
    device, which allocates nothing (the schema's bounds keep even that small)."""
    import torch

    from .networks import build_network, count_parameters

    arch = meta["architecture"]
    try:
        with torch.device("meta"):
            n = count_parameters(build_network(arch["name"], **arch["kwargs"]))
    except (ValueError, TypeError) as e:
        raise ModelError(f"{where}: cannot build architecture {arch['name']!r}: {e}", "check 'architecture' in model.json") from None
    if n > MAX_PARAMETERS:
        raise ModelError(f"{where}: the network has {n:,} parameters, more than the limit of {MAX_PARAMETERS:,}",
                         "use a smaller base_channels or depth in model.json")
    act = patch_activation_bytes(meta)
    if act > MAX_PATCH_ACTIVATION_BYTES:
        raise ModelError(
            f"{where}: one {'×'.join(map(str, meta['patch_size']))} patch needs about {act / 2**30:.1f} GiB of activations, "
            f"more than the limit of {MAX_PATCH_ACTIVATION_BYTES / 2**30:.0f} GiB",
            "use a smaller patch_size or base_channels in model.json",
        )
    return n


def patch_activation_bytes(meta: dict) -> int:
    """Estimated fp32 activation memory of one patch at inference, from model.json alone.

    Every level's features (voxels / 2**(dims·level) × channels) are held as skips until the decoder uses
    them — UNet++ keeps up to ``depth`` nodes per level, a multi-path U-Net each path's features as well —
    plus about seven full-resolution tensors in flight (block input and output, norms, concatenation;
    UNet++ ``depth`` more). Within ~25 % of the measured peak for 2D/3D U-Nets and UNet++ on CPU.
    """
    kw = meta["architecture"]["kwargs"]
    patch = meta["patch_size"]
    voxels, dims = math.prod(patch), len(patch)
    base, depth = int(kw.get("base_channels", 16)), int(kw.get("depth", 4))
    widths = [base * 2**level for level in range(depth + 1)]
    name = meta["architecture"]["name"]
    if name == "multipath_unet":
        paths = int(kw.get("paths", kw.get("in_channels", 1)))
        pc = int(kw.get("path_channels", max(1, base // 2)))
        widths = [w + paths * pc * 2**level for level, w in enumerate(widths)]
    nested = depth if name == "unetplusplus" else 1
    levels = [voxels / 2 ** (dims * level) * w for level, w in enumerate(widths)]
    in_flight = 7 + (depth if name == "unetplusplus" else 0)
    return int(4 * (nested * sum(levels) + in_flight * levels[0] + voxels * int(kw.get("in_channels", 1))))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(state: dict, path: Path) -> None:
    """Write a state dict as ``.safetensors``, atomically, with the mode a plain ``open()`` gives.

    ``safetensors.torch.save_file`` creates its own 0600 file, which would leave a trained bundle
    unreadable to anyone but its writer: serialise to bytes and write those instead.
    """
    from safetensors.torch import save

    from ..io.writers import atomic_output

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)


def write_bundle_files(folder: Path, state: dict, meta: dict, where: str) -> dict:
    """Write a bundle's two files into ``folder``: ``state`` as model.safetensors, then model.json, which is
    ``meta`` with the weights' file name and digest (the returned copy), checked (``where`` names it in
    the error) before it is written."""
    from ..io.writers import write_text

    folder = Path(folder)
    save_weights(state, folder / "model.safetensors")
    meta = {**meta, "weights": {"file": "model.safetensors", "sha256": sha256_file(folder / "model.safetensors")}}
    validate_meta(meta, where)
    write_text(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    return meta


def load_weights(path: Path) -> dict:
    """Tensors from ``.safetensors`` or a plain state dict ``.pt`` (``weights_only=True``)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: keep to one line
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        if "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError":
            raise ModelError(
                f"cannot load weights {path.name}: it holds pickled Python objects, which UNetSegment never loads "
                "(they could run code)",
                "ask for the weights as .safetensors or as a plain tensor state dict",
            ) from None
        raise ModelError(
            f"cannot load weights {path.name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}",
            "the file is corrupt or not a plain tensor state dict; re-export it with safetensors",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights {path.name} are not a state dict of tensors", "save model.state_dict() with safetensors")
    return state


def load_bundle(source: str | os.PathLike) -> Bundle:
    """Load and verify a bundle from a folder, a zip file, or a model name."""
    p = Path(source)
    if not p.exists():
        return load_bundle(resolve_model_name(str(source)))
    if p.is_file() and zipfile.is_zipfile(p):
        p = _unpack_zip(p)
    if not p.is_dir():
        raise ModelError(f"{source} is neither a model folder nor a zip", "give a folder holding model.json, or a model name")
    _refuse_symlinks(p)
    mj = p / "model.json"
    if not mj.is_file():
        raise ModelError(f"no model.json in {p}", "a model bundle is a folder with model.json and a weights file")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{mj} is not valid JSON: {e}", "fix or replace model.json") from None
    validate_meta(meta, str(mj))
    w = p / meta["weights"]["file"]
    if not w.is_file():
        raise ModelError(f"weights file {meta['weights']['file']} missing from {p}", "copy the complete bundle")
    digest = sha256_file(w)
    if digest != meta["weights"]["sha256"]:
        raise ModelError(
            f"weights {w.name} have sha256 {digest[:12]}…, model.json expects {meta['weights']['sha256'][:12]}…",
            "the file is corrupt or belongs to another model; copy the bundle again",
        )
    return Bundle(root=p.resolve(), meta=meta)


def _refuse_symlinks(folder: Path) -> None:
    """A bundle holds plain files only: a link (e.g. MODEL_CARD.md → a private file) would be read, or
    copied into the model store by ``models import``, as if it belonged to the bundle."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                rel = os.path.relpath(os.path.join(root, name), folder)
                raise ModelError(f"model bundle {folder} contains a symbolic link: {rel}",
                                 "replace it by the file itself (e.g. cp -L) or re-create the bundle")


def _unpack_zip(zpath: Path) -> Path:
    """Extract a bundle zip safely (no absolute paths, '..' or symbolic links) into a private cache folder."""
    with zipfile.ZipFile(zpath) as z:
        links = [i.filename for i in z.infolist() if stat.S_ISLNK(i.external_attr >> 16)]
    if links:
        raise ModelError(f"{zpath.name} contains a symbolic link: {links[0]}",
                         "re-create the zip from a folder of plain files (zip without --symlinks)")
    digest = sha256_file(zpath)[:16]
    dest = _private_dir(_user_cache_dir() / "bundles") / f"{zpath.stem}-{digest}"
    if (dest / "model.json").is_file():
        return dest
    with zipfile.ZipFile(zpath) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        for n in names:
            parts = Path(n).parts
            if Path(n).is_absolute() or ".." in parts:
                raise ModelError(f"{zpath.name} contains an unsafe path {n!r}", "re-create the zip from the model folder")
        tops = {Path(n).parts[0] for n in names}
        prefix = tops.pop() + "/" if len(tops) == 1 and not any(n == "model.json" for n in names) else ""
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_ensure(dest.parent)))
        for n in names:
            rel = n[len(prefix):] if prefix and n.startswith(prefix) else n
            if not rel:
                continue
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, dest) if not dest.exists() else shutil.rmtree(tmp)
    return dest


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unetsegment"


def _private_dir(d: Path) -> Path:
    """A folder only this user can write (zip bundles are unpacked here, never in a shared /tmp)."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise ModelError(f"cache folder {d} is writable by others", f"remove it or set XDG_CACHE_HOME to a private folder")
    return d


def _ensure(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_dirs() -> list[Path]:
    return [user_models_dir(), bundled_models_dir()]


def available_models() -> dict[str, Path]:
    """Model name -> folder, user-imported models shadowing bundled ones of the same name."""
    found: dict[str, Path] = {}
    for d in reversed(model_dirs()):
        if d.is_dir():
            for sub in sorted(d.iterdir()):
                if (sub / "model.json").is_file():
                    found[sub.name] = sub
    return found


def default_model_name() -> str:
    models = available_models()
    for n in DEFAULT_MODEL_PREFERENCE:
        if n in models:
            return n
    raise ModelError("no bundled model found", f"reinstall UNetSegment or pass --model PATH (looked in {bundled_models_dir()})")


def resolve_model_name(name: str) -> Path:
    models = available_models()
    if name in models:
        return models[name]
    known = ", ".join(sorted(models)) or "none"
    raise ModelError(f"unknown model {name!r} (available: {known})", "give a model name from `unetsegment models list` or a bundle folder/zip")


def import_model(source: str | os.PathLike, overwrite: bool = False) -> Bundle:
    """Validate a bundle folder/zip as ``models verify`` does (schema, sha256, size limits, weights that load
    into the network) and copy it into the user model folder under its name."""
    b = load_bundle(source)
    b.build_network()  # refuses pickled weights, mismatched shapes and absurd architectures now, not at first use
    dest = user_models_dir() / b.name
    if dest.exists() and not overwrite:
        raise ModelError(f"a model named {b.name!r} is already imported at {dest}", "pass --overwrite to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.name}.", dir=_ensure(dest.parent)))
    shutil.copytree(b.root, tmp, dirs_exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return load_bundle(dest)
