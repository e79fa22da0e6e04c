"""``unetsegment`` command line: segment, batch, serve, models, fetch-sample, demo.

Errors print one line naming the problem and the fix (no traceback unless ``--debug``) and exit
with 2 usage, 3 input, 4 model, 5 device, 6 output, 130 cancelled.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

from . import __version__
from .engine.inference import CancelToken
from .errors import UNetSegmentError, UsageError, require_extra
from .params import SegmentParams, add_arguments, params_from_args


def _nonneg(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def _posint(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be ≥ 1")
    return v


def _number_list(text: str, what: str, example: str, ok, rule: str) -> list[float]:
    """A comma list of numbers for argparse: each must pass ``ok``, else an error naming ``rule``."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {what}, e.g. {example}") from None
    if not vals or not all(ok(v) for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give {rule}")
    return vals


def _ml_list(text: str) -> list[float]:
    return _number_list(text, "volumes in mL", "0.05,0.1,0.2", lambda v: v >= 0, "one or more volumes ≥ 0 mL")


def _probability_list(text: str) -> list[float]:
    return _number_list(text, "probabilities", "0.3,0.4,0.5", lambda v: 0 < v < 1,
                        "one or more thresholds between 0 and 1 (exclusive)")


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """``--model`` and the run parameters as flags (segment, batch, serve), generated from :data:`.params.FIELDS`."""
    p.add_argument("--model", default=None, help="model name (see `models list`) or bundle folder/zip; default: the bundled default model")
    add_arguments(p)


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"unetsegment: error: {message} — see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="unetsegment", description="U-Net lesion segmentation with lesion statistics and heatmaps.")
    ap.add_argument("-V", "--version", action="version", version=f"unetsegment {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment one case (one volume per model channel)")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="volume file or DICOM folder; NAME=PATH maps a channel explicitly")
    s.add_argument("--output-dir", "-o", required=True, help="folder for the outputs (created if needed)")
    s.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run in --output-dir")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_segment_options(s)

    c = sub.add_parser("compare", help="follow-up: segment the current scan, register the prior one, report each "
                                       "lesion's change and hematoma expansion")
    c.add_argument("--prior", required=True, help="an earlier `segment` output folder, or the prior scan (volume file or "
                                                  "DICOM folder; segmented into DIR/prior with the same model)")
    c.add_argument("--current", required=True, nargs="+", metavar="INPUT",
                   help="the current scan (one volume per model channel; segmented into DIR/current), or an earlier "
                        "`segment` output folder of it")
    c.add_argument("--output-dir", "-o", required=True, help="folder for comparison.csv/.json/.png and prior_registered.nrrd")
    c.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run in --output-dir")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.add_argument("--affine", action="store_true", help="affine instead of rigid registration (e.g. another scanner's "
                                                         "calibration); rigid is right for the same head")
    c.add_argument("--stable-ml", type=float, default=0.5, help="a change within max(this, --stable-pct) is 'stable' (mL)")
    c.add_argument("--stable-pct", type=float, default=10.0, help="see --stable-ml (percent of the prior volume)")
    c.add_argument("--expansion-ml", type=float, default=6.0,
                   help="hematoma expansion: growth above this many mL (default 6; e.g. 12.5 for another trial's definition)")
    c.add_argument("--expansion-pct", type=float, default=33.0, help="… or above this percentage of the prior volume "
                                                                     "(default 33)")
    add_segment_options(c)

    m = sub.add_parser("models", help="list, show, import or verify model bundles")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models available by name")
    ms = msub.add_parser("show", help="print a model's model.json")
    ms.add_argument("model")
    mi = msub.add_parser("import", help="validate a bundle folder/zip and install it for this user")
    mi.add_argument("source")
    mi.add_argument("--overwrite", action="store_true")
    mv = msub.add_parser("verify", help="check schema, weights hash and that the network loads")
    mv.add_argument("model")

    f = sub.add_parser("fetch-sample", help="get the sample head CT (Debian invesalius-examples) as NIfTI")
    f.add_argument("--cache-dir", default=None, help="folder for head_ct.nii.gz (default: .cache/unetsegment in a checkout, "
                   "else ~/.cache/unetsegment, or $UNETSEGMENT_CACHE)")
    f.add_argument("--source", default=None, metavar="DEB_OR_INV3",
                   help="build it from an already downloaded invesalius-examples .deb or its Cranium.inv3 (no apt-get)")

    d = sub.add_parser("demo", help="segment a demo case: the sample head CT with a synthetic hemorrhage (CT models) "
                                    "or synthetic perfusion maps with an infarct core (perfusion models)")
    d.add_argument("--output-dir", "-o", default="demo-output")
    d.add_argument("--model", default=None, help="any bundled model (see `models list`); default: the default model")
    d.add_argument("--cache-dir", default=None)

    b = sub.add_parser("batch", help="segment a cohort (folder of cases or CSV list) on a Dask cluster")
    b.add_argument("source", metavar="INPUT_DIR|LIST.csv",
                   help="folder: one volume file, DICOM folder or per-case folder per case; CSV: case_id + one column per model channel")
    b.add_argument("--output-dir", "-o", required=True, help="cohort folder: DIR/<case_id>/ per case, cohort_lesions.csv, cohort_summary.csv")
    b.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://HOST:8786); default: a local cluster")
    b.add_argument("--workers", type=_posint, default=None, help="local cluster size (default: from the cores and memory)")
    b.add_argument("--resume", action="store_true", help="skip cases already complete with the same model and parameters")
    b.add_argument("--overwrite", action="store_true", help="redo cases that already have outputs")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress")
    add_segment_options(b)

    t = sub.add_parser("train", help="train a model from a YAML config into a complete bundle (resumes after interruption)")
    t.add_argument("--config", required=True, help="YAML training config (see Resources/Training/)")
    t.add_argument("--output-dir", "-o", required=True, help="bundle folder to write (checkpoints in its .training/)")

    e = sub.add_parser("evaluate", help="score a model and the HU-threshold baseline on labelled cases")
    e.add_argument("--model", required=True, help="model name or bundle folder/zip")
    e.add_argument("--cases", required=True, help="folder of case folders (label.nii.gz + image.nii.gz or <CHANNEL>.nii.gz)")
    e.add_argument("--output", default=None, help="write the full results as JSON here")
    e.add_argument("--no-baseline", action="store_true", help="skip the HU-threshold baseline")
    add_arguments(e, only=("device", "precision"))
    e.add_argument("--min-lesion-sweep", type=_ml_list, default=None, metavar="ML,ML,...",
                   help="instead: the figures for each smallest-lesion size, and the smallest meeting the default-model "
                        "targets (use a tuning split, not the cases you report)")
    e.add_argument("--threshold-sweep", type=_probability_list, default=None, metavar="P,P,...",
                   help="instead (alone or with --min-lesion-sweep, else at the model's smallest lesion): the figures "
                        "for each lesion threshold and size, and the pair to choose; one inference per case (use tuning "
                        "cases, not the cases you report)")

    v = sub.add_parser("serve", help="run the inference server (HTTP API for Slicer seats and scripts)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token-file)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token-file", default=None, help="file holding the bearer token every request must carry (mode 600)")
    v.add_argument("--work-dir", default=None, help="folder for uploads and job outputs (default: a private folder under "
                                                     "~/.cache/unetsegment/server, removed on exit; those of killed servers go at the next start)")
    v.add_argument("--max-upload-mb", type=_nonneg, default=2048.0, help="largest upload per job (HTTP 413 above)")
    v.add_argument("--max-queued", type=_posint, default=32, help="jobs allowed to wait (HTTP 429 above)")
    v.add_argument("--retention-min", type=_nonneg, default=60.0, help="minutes a finished job's files are kept")
    v.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    v.add_argument("--ssl-keyfile", default=None, help="private key of --ssl-certfile")
    add_segment_options(v)  # the server's defaults; jobs may override all but --device (comma list: one worker each) and --threads
    return ap


class _Progress:
    """Per-stage progress on stderr.

    On a terminal: a tqdm bar per stage with the percentage, the time spent and the engine's ETA (no
    rate: the engine reports fractions, not items, so a tqdm rate would be meaningless). Otherwise
    (a log, CI, a pipe): one line per stage with the time elapsed since the start, so a long run is
    never silent. The first line comes once the inputs are read: a refused input stays a one-line error.
    """

    #: the engine says "done" when its work ends; what follows is writing the files
    _RENAMED = {"done": "write"}
    _BAR_FORMAT = "{desc:<12}{percentage:3.0f}%|{bar}| {elapsed}{postfix}"

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.stage: str | None = None
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        stage = self._RENAMED.get(stage, stage)
        if stage != self.stage:
            self.stage = stage
            if not self.tty:
                print(f"[{time.perf_counter() - self.t0:7.1f} s] {stage}", file=self.stream, flush=True)
            else:
                self._new_bar(stage)
        if self.bar is not None:
            self.bar.n = int(round(max(0.0, min(1.0, fraction)) * 100))
            self.bar.set_postfix_str(message if message.startswith("ETA") else "", refresh=False)
            self.bar.refresh()

    def _new_bar(self, stage: str) -> None:
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=100, desc=stage, bar_format=self._BAR_FORMAT, leave=False, file=self.stream,
                        dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_segment(a: argparse.Namespace, cancel: CancelToken) -> int:
    from .serving.job import segment_files

    prog = _Progress(not a.quiet)
    try:
        summary = segment_files(a.inputs, a.output_dir, a.model, params_from_args(a), a.overwrite, prog, cancel)
    finally:
        prog.close()
    _print_result(summary, a.output_dir)
    return 0


def _cmd_compare(a: argparse.Namespace, cancel: CancelToken) -> int:
    from .analysis.followup import ChangeRules
    from .serving.compare import compare_files

    for name in ("stable_ml", "stable_pct", "expansion_ml", "expansion_pct"):
        if not getattr(a, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(a, name)}", "give a number ≥ 0")
    rules = ChangeRules(a.stable_ml, a.stable_pct, a.expansion_ml, a.expansion_pct)
    prog = _Progress(not a.quiet)
    try:
        result = compare_files(a.prior, a.current, a.output_dir, a.model, params_from_args(a), rules, a.affine,
                               a.overwrite, prog, cancel)
    finally:
        prog.close()
    reg, total = result["registration"], result["total"]
    print(f"{reg['kind']} registration: head overlap {reg['head_dice']:.3f}, correlation {reg['correlation']:.3f}, Mattes MI {reg['metric_value']:.4f}")
    print(f"total: prior {total['prior_ml']:.2f} mL → current {total['current_ml']:.2f} mL "
          f"({total['change_ml']:+.2f} mL), status {total['status']}, "
          f"hematoma expansion: {'YES' if total['expansion'] else 'no'}")
    print(f"{'current':>8} {'prior':>6} {'status':<9}{'prior mL':>9}{'current mL':>11}{'change mL':>10}{'change %':>9}  expansion")
    for r in result["lesions"]:
        pct = "" if r["change_pct"] is None else f"{r['change_pct']:+.0f}"
        print(f"{r['current_lesion'] or '–':>8} {r['prior_lesion'] or '–':>6} {r['status']:<9}{r['prior_ml']:>9.2f}"
              f"{r['current_ml']:>11.2f}{r['change_ml']:>+10.2f}{pct:>9}  {'YES' if r['expansion'] else 'no'}")
    print(f"outputs: {Path(a.output_dir) / 'comparison.csv'} (and .json, .png, prior_registered.nrrd)")
    return 0


def _print_result(summary: dict, out_dir) -> None:
    from .analysis.lesions import dropped_note

    out = Path(out_dir)
    print(f"model {summary['model']['name']} {summary['model']['version']} on {summary['device']} ({summary['precision']}), "
          f"{summary['timings_s'].get('total_s', 0):.1f} s")
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    les = summary.get("lesions")
    if les is not None:
        print(f"{len(les)} lesion(s), total {summary.get('total_volume_ml', 0):.2f} mL")
        # "no lesion" while the probability map has bright specks: say what the minimum size dropped
        # (with lesions found, the count of sub-minimum specks is in summary.json, not on screen)
        dropped = "" if les else dropped_note(summary.get("dropped_small_lesions"), float(summary.get("min_lesion_ml") or 0.0))
        if dropped:
            print(f"note: {dropped} — lower --min-lesion-ml to keep them")
        if les:
            _print_lesions(les[:20])
    print("outputs:")
    for f in sorted(p.name for p in out.iterdir() if not p.name.startswith(".")):
        print(f"  {out / f}")


def _print_lesions(les: list[dict]) -> None:
    """The lesion rows, naming the two slices apart (and the DICOM image numbers for a series input)."""
    dicom = any(r.get("dicom_instance_number") is not None for r in les)
    extra = f" {'DICOM image (centroid/largest)':>31}" if dicom else ""
    print(f"{'#':>3} {'label':<14}{'volume mL':>10} {'ABC/2 mL':>9} {'centroid slice':>15} {'largest-area slice':>19} {'diam mm':>8} "
          f"{'side':>8}{extra}  centroid RAS")
    for r in les:
        ax = r["slice_axis"]
        extra = f" {str(r.get('dicom_instance_number')) + '/' + str(r.get('dicom_largest_instance_number')):>31}" if dicom else ""
        abc2 = f"{r['abc2_ml']:.2f}" if r.get("abc2_ml") is not None else "–"
        print(f"{r['lesion']:>3} {r['label']:<14}{r['volume_ml']:>10.2f} {abc2:>9} {ax + '=' + str(r['slice_index']):>15} "
              f"{ax + '=' + str(r['largest_area_slice']):>19} {r['max_inplane_diameter_mm']:>8.1f} {r['side'] or '–':>8}{extra}  "
              f"({r['centroid_r']:.1f}, {r['centroid_a']:.1f}, {r['centroid_s']:.1f})")


def _cmd_models(a: argparse.Namespace) -> int:
    from .models.bundle import available_models, default_model_name, import_model, load_bundle

    if a.models_command == "list":
        models = available_models()
        try:
            default = default_model_name()
        except UNetSegmentError:
            default = None
        for name, path in models.items():
            try:
                b = load_bundle(path)
                width = max(40, shutil.get_terminal_size((120, 24)).columns - 61)  # 61: the columns before it
                title = textwrap.shorten(b.meta.get("title", b.meta["description"]), width, placeholder=" …")
                desc = f"{b.version:<8} {b.dimensions:<5} {'/'.join(b.channel_names):<20} {title}"
            except UNetSegmentError as e:
                desc = f"INVALID: {e}"
            print(f"{name:<22}{'*' if name == default else ' '} {desc}")
        return 0
    if a.models_command == "show":
        print(json.dumps(load_bundle(a.model).meta, indent=2))
        return 0
    if a.models_command == "import":
        b = import_model(a.source, overwrite=a.overwrite)
        print(f"imported {b.name} {b.version} into {b.root}")
        return 0
    if a.models_command == "verify":
        from .models.networks import count_parameters

        b = load_bundle(a.model)
        net = b.build_network()
        print(f"OK {b.name} {b.version}: schema valid, sha256 matches, {count_parameters(net):,} parameters load")
        return 0
    return 2


def _cmd_fetch_sample(a: argparse.Namespace) -> int:
    from .io.sample import fetch_sample

    print(fetch_sample(Path(a.cache_dir) if a.cache_dir else None, Path(a.source) if a.source else None))
    return 0


def _cmd_demo(a: argparse.Namespace, cancel: CancelToken) -> int:
    from .demo import run_demo

    summary = run_demo(Path(a.output_dir), a.model, Path(a.cache_dir) if a.cache_dir else None, progress=_Progress(True), cancel=cancel)
    _print_result(summary, a.output_dir)
    return 0


def _cmd_batch(a: argparse.Namespace, cancel: CancelToken) -> int:
    require_extra("batch", "`unetsegment batch`")
    from .serving.batch import BATCH_PARTIAL_EXIT, CohortProgress, run_cohort

    prog = CohortProgress(enabled=not a.quiet)
    try:
        r = run_cohort(a.source, a.output_dir, a.model, params_from_args(a), scheduler=a.scheduler, workers=a.workers,
                       resume=a.resume, overwrite=a.overwrite, progress=prog, cancel=cancel)
    finally:
        prog.close()
    for n in r["notes"]:
        print(f"note: {n}")
    print(f"{r['total']} case(s): {r['ok']} ok, {r['resumed']} resumed, {r['failed']} failed in {r['wall_s']:.1f} s "
          f"on {r['workers']} worker(s)")
    print(f"  {r['cohort_summary']}\n  {r['cohort_lesions']}")
    return BATCH_PARTIAL_EXIT if r["failed"] else 0


def _cmd_serve(a: argparse.Namespace) -> int:
    require_extra("serve", "`unetsegment serve`")
    from .models.bundle import default_model_name, load_bundle
    from .serving.auth import read_token_file
    from .serving.server import ServerConfig, serve

    token = read_token_file(a.token_file) if a.token_file else None
    model = a.model or default_model_name()
    load_bundle(model)  # refuse a broken default model now, not at the first job
    cfg = ServerConfig(work_dir=Path(a.work_dir) if a.work_dir else None, token=token,
                       max_upload_bytes=int(a.max_upload_mb * (1 << 20)), max_queued=a.max_queued,
                       retention_s=a.retention_min * 60.0, model=model, params=params_from_args(a),
                       devices=tuple(d.strip() for d in a.device.split(",") if d.strip()) or ("auto",))
    print(f"unetsegment serve: model {model}, device(s) {', '.join(cfg.devices)}, "
          f"{'bearer token required' if token else 'no authentication'}", file=sys.stderr)
    serve(cfg, a.host, a.port, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile)
    return 0


#: commands that poll the cancel token; others stop at once on SIGTERM
COOPERATIVE_COMMANDS = ("segment", "compare", "demo", "batch", "serve")


#: commands whose process ends without the interpreter's teardown once their outputs are written and
#: the streams flushed: with PyTorch, SimpleITK and matplotlib loaded the teardown alone takes about
#: 0.5 s of the user's wait (bench/end_to_end.py), and nothing of the run depends on it
FAST_EXIT_COMMANDS = ("segment",)


def main(argv: list[str] | None = None) -> int:
    """Run one command line (``argv``, default ``sys.argv[1:]``); returns the exit code."""
    ap = build_parser()
    return run_command(ap, ap.parse_args(argv))


def console_main() -> None:
    """The ``unetsegment`` console command: :func:`main`, then the process exits (at once after ``segment``).
    The process is ours, so freed arrays are kept for reuse (:mod:`.engine.memory_reuse`)."""
    from .engine.memory_reuse import reuse_freed_memory

    reuse_freed_memory()
    ap = build_parser()
    a = ap.parse_args()
    code = run_command(ap, a)
    if a.command in FAST_EXIT_COMMANDS:
        _flush_all()
        os._exit(code)
    sys.exit(code)


def _stdout_gone() -> bool:
    """Whether standard output's reader has gone (a broken pipe); if so, it is pointed at the null device
    so that nothing written later, at exit either, fails again."""
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return True


def _flush_all() -> None:
    """Python's streams and C's stdio buffers (what ITK or oneDNN printed), before an exit that skips
    the interpreter's teardown; a reader that has gone (``| head -1``) is no error."""
    import ctypes

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def run_command(ap: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """The parsed command ``a`` of parser ``ap``, with one-line errors and their exit codes."""
    cancel = CancelToken()

    def _on_term(signum, frame):
        cancel.cancel()  # cooperative stop: the engine checks between windows
        if a.command not in COOPERATIVE_COMMANDS:
            raise KeyboardInterrupt  # e.g. training: stop now; the last checkpoint is intact

    signal.signal(signal.SIGTERM, _on_term)
    from .io.readers import quiet_itk

    quiet_itk()
    t0 = time.perf_counter()
    try:
        if a.command == "segment":
            return _cmd_segment(a, cancel)
        if a.command == "compare":
            return _cmd_compare(a, cancel)
        if a.command == "models":
            return _cmd_models(a)
        if a.command == "fetch-sample":
            return _cmd_fetch_sample(a)
        if a.command == "demo":
            return _cmd_demo(a, cancel)
        if a.command == "batch":
            return _cmd_batch(a, cancel)
        if a.command == "train":
            require_extra("train", "`unetsegment train`")
            from .models.training.trainer import train

            train(Path(a.config), Path(a.output_dir))
            return 0
        if a.command == "evaluate":
            from .analysis.evaluate import main_evaluate

            main_evaluate(a.model, Path(a.cases), Path(a.output) if a.output else None,
                          SegmentParams(device=a.device, precision=a.precision, heatmaps=()), baseline=not a.no_baseline,
                          min_lesion_sweep=a.min_lesion_sweep, threshold_sweep=a.threshold_sweep)
            return 0
        if a.command == "serve":
            return _cmd_serve(a)
        ap.error(f"unknown command {a.command}")
    except UNetSegmentError as e:
        if a.debug:
            raise
        print(f"unetsegment: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("unetsegment: cancelled — no outputs were written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if isinstance(e, BrokenPipeError) and _stdout_gone():
            return 0  # the reader of the printed result went away (``| head -1``); the work itself is done
        if a.debug:
            raise
        print(f"unetsegment: internal error after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e} "
              "— rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    console_main()
