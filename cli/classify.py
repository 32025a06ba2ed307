"""``dinat-classify``: classify image files with a DiNAT / NAT model.

    dinat-classify IMAGE_OR_DIR... [--files-from FILE|-] [--model NAME_OR_HUB_ID | --weights DIR]
                   [--top-k 5] [--json | --jsonl] [--batch-size N] [--threads N] [--device cpu|cuda]
                   [--dask SCHEDULER_ADDRESS] [--no-progress]
    dinat-classify --list-models | --version

``-`` as an input reads one image from standard input. ``--jsonl`` prints one JSON object per image
as soon as it is classified, ``{"path", "predictions"}``, or ``{"path", "error"}`` for an image that
could not be read (``--json`` lists those too).

Exit status: 0 every image classified, 1 some image could not be read, decoded or classified, 2 usage
error (bad option, unknown model, a model that is broken, nothing to classify), 3 the model's weights
are unavailable (not cached, and no source can deliver them: offline, no network, an interrupted
download), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). What is refused and why: docs/limits.md.

Only argparse, the standard library and ``dinat_np.classifier`` (which defers NumPy, Pillow and the
model code to first use) are imported before the arguments are parsed: ``--threads`` must reach
OpenBLAS/OpenMP/MKL through the environment before NumPy loads them, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TextIO

from dinat_np import __version__
from dinat_np.classifier import DEFAULT_BATCH_SIZE  # light: the standard library only, no NumPy
from dinat_np.staging import Terminated, raise_on_sigterm  # the standard library only

PROG = "dinat-classify"
DEFAULT_MODEL = "dinat-mini-in1k-224"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
# A batch's pixels and activations stay in memory together: 256 images at 224 px take about 2 GB.
MAX_BATCH_SIZE = 256

EXIT_SOME_FAILED, EXIT_USAGE, EXIT_WEIGHTS_UNAVAILABLE = 1, 2, 3


class UsageError(Exception):
    """A problem with the command line or the model choice: message, exit status 2."""


class WeightsUnavailable(Exception):
    """The model is not cached and cannot be fetched: message, exit status 3."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bounded_int(most: int, why: str) -> Any:
    """An argparse type: an integer from 1 to ``most``."""

    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"at most {most} ({why}), got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Classify images with a model of the DiNAT family: DiNAT, NAT, DiNAT_s, NAT / DiNAT "
                    "isotropic, ViT-rpb (NumPy + Numba, no PyTorch).",
        epilog=(
            "Directories are searched recursively for image files. The default model is downloaded "
            "and converted on first use and cached (see DINAT_NP_HOME and the Hugging Face cache); the "
            "bundled offline demo is --model digits-demo. Exit status: 0 all images classified, 1 some "
            "image failed, 2 usage error, 3 the model's weights are unavailable, 130 interrupted, "
            "143 terminated (docs/limits.md)."
        ),
    )
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                        help="image files or directories; - reads one image from standard input")
    parser.add_argument("--files-from", metavar="FILE", default=None,
                        help="also classify the paths listed in FILE, one per line (- for standard input)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", metavar="NAME", default=None,
        help=f"registry name or Hugging Face repo id of the model (default: {DEFAULT_MODEL}; "
             "offline demo: digits-demo; see --list-models)",
    )
    source.add_argument(
        "--weights", metavar="DIR", default=None,
        help="folder with config.json + model.safetensors (+ preprocessor_config.json)",
    )
    parser.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                        help="number of classes to show per image (default: 5)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    output.add_argument("--jsonl", action="store_true",
                        help="print one JSON object per line and image, as soon as it is classified")
    parser.add_argument("--batch-size", type=_bounded_int(MAX_BATCH_SIZE, "a batch is held in memory at once"),
                        default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per forward pass, 1 to {MAX_BATCH_SIZE} (default: {DEFAULT_BATCH_SIZE})")
    cpus = os.cpu_count() or 1
    parser.add_argument("--threads", type=_bounded_int(cpus, "the number of CPUs"), default=None, metavar="N",
                        help=f"CPU threads for Numba kernels and BLAS, 1 to {cpus} (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr (classification, model download)")
    parser.add_argument("--dask", metavar="SCHEDULER_ADDRESS", default=None,
                        help="classify on a Dask cluster, one model per worker process (needs the 'dask' "
                             "extra; the workers must see the image files)")
    parser.add_argument("--list-models", action="store_true",
                        help="list the registry's models, their Hugging Face ids and which are cached, then exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# ---------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------


def configure_threads(count: int) -> None:
    """Use ``count`` threads for BLAS (OpenBLAS/OpenMP/MKL) and for Numba's parallel kernels.

    BLAS libraries read their thread count from the environment once, when NumPy loads them: the
    command sets the variables before anything imports NumPy. If NumPy is already loaded (``main()``
    called inside a program that imported it), only Numba's thread count and the variables are set;
    BLAS threads then follow the environment that was in place when NumPy loaded.
    """
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(count)
    import numba

    from dinat_np.kernels import cpu  # its set_num_threads sets the process up: the threading layer before the pool

    cpu.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


# ---------------------------------------------------------------------------------------------------------
# Inputs and output
# ---------------------------------------------------------------------------------------------------------


def collect_inputs(arguments: Sequence[str]) -> list[str]:
    """Files as given (any name) and image files found under directories (sorted, hidden ones skipped)."""
    from dinat_np.image_loading import IMAGE_EXTENSIONS  # after configure_threads: it loads NumPy

    found: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            for root, directories, files in os.walk(argument):
                directories[:] = sorted(d for d in directories if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        path = os.path.join(root, name)
                        if _is_special_file(path):
                            # A FIFO would block the whole run; a device could be endless.
                            _error(f"skipping {path}: not a regular file (a FIFO, socket or device)", "warning")
                            continue
                        found.append(path)
        else:
            found.append(argument)  # a missing or unreadable file is reported when it is loaded
    return found


def _is_special_file(path: str) -> bool:
    """A FIFO, socket or device (a broken link is not: loading it reports what is wrong)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Progress:
    """A one-line progress bar on a stream (stderr); redrawn in place on a terminal."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = enabled and total > 1
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = False
        self._last_tenth = 0

    def _line(self) -> str:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        return f"classifying [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"

    def start(self) -> None:
        """Draw the empty bar on a terminal, so a slow first batch does not look like a hang."""
        if self.enabled and self.interactive:
            self.stream.write(self._line())
            self.stream.flush()
            self._drawn = True

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r" + self._line())
        else:
            # A log file gets a line per tenth of the work, not one per batch.
            tenth = 10 * self.done // self.total
            if tenth == self._last_tenth and self.done < self.total:
                return
            self._last_tenth = tenth
            self.stream.write(self._line() + "\n")
        self.stream.flush()
        self._drawn = True

    def message(self, text: str) -> None:
        """Print a line on the stream without leaving a half-drawn bar in front of it."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.redraw()

    def clear(self) -> None:
        """Erase the bar on a terminal (before something else is printed there)."""
        if self.enabled and self.interactive and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def redraw(self) -> None:
        if self.enabled and self.interactive and self._drawn:
            self.stream.write(self._line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


COMPILING_NOTICE = (f"{PROG}: compiling the kernels for this machine (first run only, up to a minute; "
                    "cached for the next runs)")


def announcing_compiling(say: Callable[[str], None]) -> AbstractContextManager[Any]:
    """While active, say once, when Numba starts compiling (its cache holds no kernel for this machine
    yet), why the first images take long; a warm cache compiles nothing and says nothing."""
    from numba.core import event

    class Notice(event.Listener):
        said = False

        def on_start(self, _event: event.Event) -> None:
            if not self.said:
                self.said = True
                say(COMPILING_NOTICE)

        def on_end(self, _event: event.Event) -> None:
            pass

    return event.install_listener("numba:compile", Notice())


def format_table(path: str, predictions: Sequence[dict[str, Any]]) -> str:
    """The readable per-image block: a header line, then rank, probability and label."""
    lines = [path, f"  {'rank':>4}  {'probability':>11}  label"]
    for p in predictions:
        lines.append(f"  {p['rank']:>4}  {100.0 * p['score']:>10.2f}%  {p['label']}")
    return "\n".join(lines)


def _error(text: str, kind: str = "error") -> None:
    sys.stderr.write(f"{PROG}: {kind}: {text}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (see the module's documentation)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage / help / the version
        return int(exit_.code or 0) if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return _list_models(args) if args.list_models else _run(args)
    except UsageError as error:
        _error(str(error))
        return EXIT_USAGE
    except WeightsUnavailable as error:
        _error(str(error))
        return EXIT_WEIGHTS_UNAVAILABLE
    except Terminated:
        sys.stderr.write(f"\n{PROG}: terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


def _run(args: argparse.Namespace) -> int:
    raise_on_sigterm()  # so that an interrupted download removes its partial file
    if args.threads is not None:
        configure_threads(args.threads)
    _refuse_bombs_quietly()

    items = _gather_inputs(args)
    classifier = _load_classifier(args)

    progress = Progress(len(items), sys.stderr, enabled=not args.no_progress)
    documents: list[dict[str, Any]] = []
    failures = 0
    progress.start()
    try:
        with announcing_compiling(progress.message):
            for record in _classify(classifier, items, args, progress):
                record = _without_non_finite_scores(record)
                if "error" in record:
                    failures += 1
                    progress.message(f"{PROG}: cannot classify {record['path']}: {record['error']}")
                if args.jsonl:
                    _write_stdout(json_text(record), as_utf8=True)
                elif args.json:
                    documents.append(record)
                elif "error" not in record:
                    # stdout and stderr often share the terminal: keep the bar off the table's lines.
                    shared = sys.stdout.isatty()
                    if shared:
                        progress.clear()
                    _write_stdout(format_table(record["path"], record["predictions"]) + "\n\n")
                    if shared:
                        progress.redraw()
    finally:
        progress.close()
    if args.json:
        _write_stdout(json_text(documents, indent=2), as_utf8=True)
    if failures:
        ok = len(items) - failures
        _error(f"{failures} of {len(items)} image(s) could not be classified ({ok} classified)")
        return EXIT_SOME_FAILED
    return 0


def _gather_inputs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, source) of every image: files and directories, ``--files-from``'s list, ``-``'s bytes."""
    if "-" in args.inputs and args.files_from == "-":
        raise UsageError("standard input cannot hold both an image (-) and the file list (--files-from -)")
    listed: list[str] = []
    if args.files_from is not None:
        try:
            if args.files_from == "-":
                text = sys.stdin.read()
            else:
                with open(args.files_from, encoding="utf-8") as stream:
                    text = stream.read()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--files-from {args.files_from}: {getattr(error, 'strerror', None) or error}") from None
        listed = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    items: list[tuple[str, Any]] = []
    for argument in args.inputs:
        if argument == "-":
            items.append(("-", sys.stdin.buffer.read()))
        else:
            items.extend((path, path) for path in collect_inputs([argument]))
    items.extend((path, path) for path in collect_inputs(listed))
    if not items:
        given = [repr(a) for a in args.inputs] + ([f"--files-from {args.files_from}"] if args.files_from else [])
        raise UsageError("nothing to classify: " + (
            "no image files in " + ", ".join(given) if given
            else "give image files, directories, --files-from FILE or - (one image on standard input)"))
    return items


def _classify(classifier: Any, items: list[tuple[str, Any]], args: argparse.Namespace,
              progress: Progress) -> Iterator[dict[str, Any]]:
    """One record per input, in input order: here, or on the Dask cluster of ``--dask``."""
    if args.dask is not None:
        from dinat_np.cli.on_dask import DaskUnavailable, classify_on_dask

        try:
            yield from classify_on_dask(args.dask, classifier, items, top_k=args.top_k, batch_size=args.batch_size,
                                        threads=args.threads, on_progress=progress.update)
        except DaskUnavailable as error:
            raise UsageError(str(error)) from None
        return
    names = iter([name for name, _ in items])
    # Drawn to the end (not zipped with the names): the last batch reports its progress after it is yielded.
    for result in classifier.iter_predict([source for _, source in items], top_k=args.top_k,
                                          batch_size=args.batch_size, on_progress=progress.update):
        yield result.to_dict(path=next(names))


def _list_models(args: argparse.Namespace) -> int:
    """The registry's models, their Hugging Face ids and cached folders; Hub repos cached by id too."""
    from dinat_np import hub

    rows = []
    for name, entry in sorted(hub.load_registry().items()):
        rows.append({"name": name, "hf_repo": entry.get("hf_repo"), "description": entry.get("description", ""),
                     "cached": [str(folder) for folder in hub.cached_folders(name)]})
    known = {row["hf_repo"] for row in rows}
    for repo_id in hub.cached_repo_ids():
        if repo_id not in known:
            rows.append({"name": repo_id, "hf_repo": repo_id, "description": "",
                         "cached": [str(folder) for folder in hub.cached_folders(repo_id)]})
    if args.json or args.jsonl:
        lines = [json.dumps(row) for row in rows] if args.jsonl else [json.dumps(rows, indent=2)]
        _write_stdout("\n".join(lines) + "\n")
        return 0
    _write_stdout(f"{'NAME':36} {'HUGGING FACE ID':40} CACHED\n")
    for row in rows:
        _write_stdout(f"{row['name']:36} {row['hf_repo'] or '-':40} {'yes' if row['cached'] else 'no'}\n")
    return 0


def _refuse_bombs_quietly() -> None:
    """Make Pillow's DecompressionBombWarning an error, which the image loader turns into its own message.

    Pillow warns between MAX_IMAGE_PIXELS and twice it, on stderr and naming its own source file; the
    loader refuses those images anyway. A process-wide filter: fine for a program, not for a library.
    """
    import warnings

    from PIL import Image

    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _without_non_finite_scores(record: dict[str, Any]) -> dict[str, Any]:
    """The record, or an error record when its scores are NaN or infinite (the model overflowed): such
    scores are never shown."""
    if all(math.isfinite(p["score"]) for p in record.get("predictions", ())):
        return record
    return {"path": record["path"],
            "error": "the model gave NaN or infinite scores (its weights make the values overflow float32)"}


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(data: Any, indent: int | None = None) -> str:
    """A line (``indent`` None: --jsonl) or document of valid JSON in UTF-8, also for file names that are
    not UTF-8: those reach Python with each undecodable byte as a lone surrogate (U+DC80..U+DCFF), written
    as ``\\udcXX`` escapes, which ``os.fsencode(json.loads(...))`` turns back into the bytes."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text) + "\n"


def _write_stdout(text: str, as_utf8: bool = False) -> None:
    """Write to stdout: ``as_utf8`` in UTF-8 whatever the locale (JSON); otherwise in the locale's
    encoding, with backslash escapes for what it cannot encode."""
    try:
        if as_utf8 and hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            sys.stdout.buffer.write(text.encode("utf-8"))
        else:
            try:
                sys.stdout.write(text)
            except UnicodeEncodeError:
                encoding = sys.stdout.encoding or "utf-8"
                sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None


def _load_classifier(args: argparse.Namespace) -> Any:
    """Build the ImageClassifier; unavailable weights become a WeightsUnavailable (exit 3), other model
    problems a UsageError (exit 2), each with a plain message."""
    from dinat_np.classifier import ImageClassifier
    from dinat_np.hub import WeightsUnavailableError

    if args.weights is not None:
        if not os.path.isdir(args.weights):
            raise UsageError(f"--weights {args.weights}: no such folder")
        target = args.weights
    elif args.model is not None and not args.model.strip():
        raise UsageError("--model needs a model name (see `dinat-convert --list`), got an empty one")
    else:
        target = args.model or DEFAULT_MODEL
    try:
        return ImageClassifier.from_pretrained(
            target, device=args.device, batch_size=args.batch_size, progress=not args.no_progress
        )
    except WeightsUnavailableError as error:
        raise WeightsUnavailable(_model_message(target, error)) from None
    except LookupError as error:  # unknown names; str(KeyError) would quote the message
        raise UsageError(_model_message(target, error.args[0] if error.args else error)) from None
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        raise UsageError(_model_message(target, error)) from None
    except Exception as error:
        # The registry/download layer raises its own exception types with complete messages.
        if type(error).__module__.startswith("dinat_np"):
            raise UsageError(_model_message(target, error)) from None
        raise


def _model_message(target: str, error: Any) -> str:
    text = str(error).strip() or type(error).__name__
    return text if target in text else f"model {target}: {text}"


if __name__ == "__main__":  # pragma: no cover - `python -m dinat_np.cli.classify`
    sys.exit(main())
