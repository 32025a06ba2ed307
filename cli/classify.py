"""``dinat-classify``: classify image files with a DiNAT / NAT model.

    dinat-classify IMAGE_OR_DIR... [--model NAME | --weights DIR] [--top-k 5] [--json]
                   [--batch-size N] [--threads N] [--device cpu|cuda] [--no-progress]

Exit status: 0 every image classified, 1 some image could not be read or decoded, 2 usage error
(bad option, model not available, nothing to classify).

Only argparse, the standard library and ``dinat_np.classifier`` (which defers NumPy, Pillow and the
model code to first use) are imported before the arguments are parsed: ``--threads`` must reach
OpenBLAS/OpenMP/MKL through the environment before NumPy loads them, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence, TextIO

from dinat_np.classifier import DEFAULT_BATCH_SIZE  # light: the standard library only, no NumPy

PROG = "dinat-classify"
DEFAULT_MODEL = "dinat-mini-in1k-224"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

class UsageError(Exception):
    """A problem with the command line or the model choice: message, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Classify images with a model of the DiNAT family: DiNAT, NAT, DiNAT_s, NAT / DiNAT "
                    "isotropic, ViT-rpb (NumPy + Numba, no PyTorch).",
        epilog=(
            "Directories are searched recursively for image files. The default model is downloaded "
            "and converted on first use and cached (see DINAT_NP_HOME); the bundled offline demo is "
            "--model digits-demo. Exit status: 0 all images classified, 1 some image failed, "
            "2 usage error."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", metavar="NAME", default=None,
        help=f"registry name of the model (default: {DEFAULT_MODEL}; offline demo: digits-demo)",
    )
    source.add_argument(
        "--weights", metavar="DIR", default=None,
        help="folder with config.json + model.safetensors (+ preprocessor_config.json)",
    )
    parser.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                        help="number of classes to show per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for Numba kernels and BLAS (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr (classification, model download)")
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
    from dinat_np.preprocessing import IMAGE_EXTENSIONS  # after configure_threads: it loads NumPy

    found: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            for root, directories, files in os.walk(argument):
                directories[:] = sorted(d for d in directories if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        found.append(os.path.join(root, name))
        else:
            found.append(argument)  # a missing or unreadable file is reported when it is loaded
    return found


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


def format_table(path: str, predictions: Sequence[Any]) -> str:
    """The readable per-image block: a header line, then rank, probability and label."""
    lines = [path, f"  {'rank':>4}  {'probability':>11}  label"]
    for p in predictions:
        lines.append(f"  {p.rank:>4}  {100.0 * p.score:>10.2f}%  {p.label}")
    return "\n".join(lines)


def _error(text: str) -> None:
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 some image failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage / help
        return int(exit_.code or 0) if isinstance(exit_.code, int) else 2
    try:
        return _run(args)
    except UsageError as error:
        _error(str(error))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        configure_threads(args.threads)

    inputs = collect_inputs(args.inputs)
    if not inputs:
        raise UsageError(
            "nothing to classify: no image files in " + ", ".join(repr(a) for a in args.inputs)
        )
    classifier = _load_classifier(args)

    progress = Progress(len(inputs), sys.stderr, enabled=not args.no_progress)
    documents: list[dict[str, Any]] = []
    failures = 0
    progress.start()
    try:
        for result in classifier.iter_predict(
            inputs, top_k=args.top_k, batch_size=args.batch_size, on_progress=progress.update
        ):
            path = str(result.source)
            if result.error is not None:
                failures += 1
                progress.message(f"{PROG}: cannot classify {path}: {result.error.reason}")
                continue
            if args.json:
                documents.append({"path": path, "predictions": [p.to_dict() for p in result.predictions]})
            else:
                # stdout and stderr often share the terminal: keep the bar off the table's lines.
                shared = sys.stdout.isatty()
                if shared:
                    progress.clear()
                _write_stdout(format_table(path, result.predictions) + "\n\n")
                if shared:
                    progress.redraw()
    finally:
        progress.close()
    if args.json:
        _write_stdout(json.dumps(documents, indent=2, ensure_ascii=False) + "\n")
    if failures:
        ok = len(inputs) - failures
        _error(f"{failures} of {len(inputs)} image(s) could not be classified ({ok} classified)")
        return 1
    return 0


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None


def _load_classifier(args: argparse.Namespace) -> Any:
    """Build the ImageClassifier; model problems become a UsageError with a plain message."""
    from dinat_np.classifier import ImageClassifier

    if args.weights is not None:
        if not os.path.isdir(args.weights):
            raise UsageError(f"--weights {args.weights}: no such folder")
        target = args.weights
    else:
        target = args.model or DEFAULT_MODEL
    try:
        return ImageClassifier.from_pretrained(
            target, device=args.device, batch_size=args.batch_size, progress=not args.no_progress
        )
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
