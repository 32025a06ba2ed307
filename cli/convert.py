"""``dinat-convert``: turn a DiNAT / NAT checkpoint into a dinat-np folder (config.json + model.safetensors).

    dinat-convert SRC OUT_DIR [--model NAME | --config config.json | --original-args ARGS.json]
                  [--dtype float32|float16|bfloat16]
    dinat-convert --list

SRC is an original SHI-Labs .pth, a Hugging Face pytorch_model.bin or model.safetensors, or a
Hugging Face folder.  No PyTorch is needed and nothing in the checkpoint is executed.

Exit status: 0 converted, 1 the conversion failed (nothing was written), 2 usage error, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); an interrupted conversion leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dinat_np.staging import Terminated, raise_on_sigterm
from dinat_np.state_dict import STORAGE_DTYPES

_EPILOG = """\
examples:
  dinat-convert dinat_mini_in1k_224.pth ./dinat-mini --model dinat-mini-in1k-224
  dinat-convert ./hf-download/dinat-mini-in1k-224 ./dinat-mini --dtype float16
  dinat-convert my_finetune.pth ./mine --config my_config.json
  dinat-convert my_dinat_s.pth ./mine --original-args args.json

The weights tell the architecture except DiNAT's dilations; give them with --model (a registry
entry, see --list) or --config (an HF config.json). Nothing is written unless the conversion succeeds.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinat-convert",
        description="Convert a DiNAT / NAT checkpoint (original .pth, HF .bin / .safetensors / folder) "
                    "to a dinat-np folder, without PyTorch.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="?", help="checkpoint file or Hugging Face folder")
    parser.add_argument("out_dir", nargs="?", help="folder to create (config.json + model.safetensors)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME", help="registry entry giving dilations, labels and a cross-check")
    which.add_argument("--config", metavar="CONFIG_JSON", help="an HF config.json giving dilations / labels")
    which.add_argument("--original-args", metavar="ARGS_JSON",
                       help='a DiNAT_s / NATIsotropic checkpoint\'s constructor arguments: '
                            '{"constructor": "DiNAT_s" | "NATIsotropic", "kwargs": {...}} (see docs/family.md)')
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32",
                        help="storage dtype of the weights (computation is always float32; default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files of an existing OUT_DIR")
    parser.add_argument("--list", action="store_true", help="list the registry's models and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dinat-convert``; returns the exit status (0 on success)."""
    parser = _parser()
    args = parser.parse_args(argv)
    raise_on_sigterm()  # so that the staging folder of an interrupted conversion is removed
    try:
        if args.list:
            from dinat_np.registry import load_registry

            for name, entry in sorted(load_registry().items()):
                print(f"{name:36s} {entry.get('description', '')}")
            return 0
        if not args.src or not args.out_dir:
            parser.print_usage(sys.stderr)
            print("dinat-convert: error: SRC and OUT_DIR are required", file=sys.stderr)
            return 2
        from dinat_np.convert import convert_checkpoint
        from dinat_np.modeling_auto import check_weights

        out = convert_checkpoint(args.src, args.out_dir, check_weights=check_weights, model=args.model,
                                 config=args.config, dtype=args.dtype, overwrite=args.overwrite,
                                 original_args=args.original_args)
        print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} ({args.dtype})")
        return 0
    except Terminated:
        print("dinat-convert: terminated; no partial output was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("dinat-convert: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is reported as a message, never a traceback
        print(f"dinat-convert: error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(error: Exception) -> str:
    """The message of an error; for the operating system's, its wording without the errno number."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
