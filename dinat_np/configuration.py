"""`DinatConfig`: the architecture of a DiNAT / NAT model, read from and written to HF `config.json`.

`ModelConfig` is what every configuration of the family shares (labels, problem type, backbone
outputs, unknown keys kept, `config.json` reading and writing); `configuration_family` builds the
other architectures' configs and `AutoConfig` on it."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

from .kernels.common import ACTIVATIONS
from .staging import make_staging_file

CONFIG_NAME = "config.json"

# Every field of transformers' DinatConfig, with its default (the dinat-mini architecture).
_DEFAULTS: dict[str, Any] = {
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 64,
    "depths": [3, 4, 6, 5],
    "num_heads": [2, 4, 8, 16],
    "kernel_size": 7,
    "dilations": [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    "mlp_ratio": 3.0,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.1,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "layer_scale_init_value": 0.0,
}

# Ranges outside which a configuration is refused before anything is allocated (docs/limits.md): far
# beyond every published DiNAT / NAT model, small enough that no size computation overflows.
MAX_PARAMETERS = 2_000_000_000  # ten times DiNAT-Large
MAX_LABELS = 100_000
MAX_CHANNELS = 1024
MAX_EMBED_DIM = 65536
MAX_STAGES = 8
MAX_DEPTH = 1024
MAX_KERNEL_SIZE = 127
MAX_DILATION = 4096
MAX_MLP_RATIO = 64

SUPPORTED_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "identity")  # what the kernels implement
_MODEL_TYPES = {"dinat": "Dinat", "nat": "Nat"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _undilated(depths: Any) -> list[list[int]]:
    """Dilation 1 in every layer of ``depths`` (NAT's), or ``[]`` where validation will refuse the depths:
    ``[1] * 10**12`` would not be refused in time, nor ``[1] * 10**9`` in bounded memory."""
    if _int_list(depths) and len(depths) <= MAX_STAGES and all(depth <= MAX_DEPTH for depth in depths):
        return [[1] * depth for depth in depths]
    return []


class ModelConfig:
    """What every configuration shares with HF's ``PretrainedConfig``: label maps, problem type, backbone
    outputs, unknown ``config.json`` keys kept and written back, and ``config.json`` reading and writing.

    A subclass sets ``model_type``, declares its architecture fields with their defaults in ``FIELDS``,
    names the properties it derives from them in ``DERIVED`` (written to ``config.json``, ignored when
    read back) and its classification model in ``architecture``.
    """

    FIELDS: dict[str, Any] = {}
    DERIVED: tuple[str, ...] = ()
    architecture = ""
    model_type = ""

    def _set_fields(self, kwargs: dict[str, Any]) -> None:
        """Each field from ``kwargs`` or its default; what remains (derived fields aside) is kept as extra."""
        for name, default in self.FIELDS.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        for derived in self.DERIVED:
            kwargs.pop(derived, None)
        self.extra = kwargs

    def _fail(self, field: str, why: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field}: {why}")

    def _set_labels(
        self, id2label: dict | None, label2id: dict | None, num_labels: int | None, problem_type: str | None
    ) -> None:
        for field, value in (("id2label", id2label), ("label2id", label2id)):
            if value is not None and not isinstance(value, dict):
                self._fail(field, f"must be a mapping, got {type(value).__name__}")
        if num_labels is not None and (not _is_int(num_labels) or not 0 <= num_labels <= MAX_LABELS):
            self._fail("num_labels", f"must be an integer from 0 to {MAX_LABELS}, got {num_labels!r}")
        if id2label is not None and len(id2label) > MAX_LABELS:
            self._fail("id2label", f"{len(id2label)} labels, more than the limit of {MAX_LABELS}")
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        try:
            self.id2label = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            self._fail("id2label", f"keys must be class indices, got {list(id2label)[:5]!r}")
        if num_labels is not None and num_labels != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            label2id = None  # the labels given were for another number of classes
        try:
            self.label2id = {str(k): int(v) for k, v in label2id.items()} if label2id else {
                v: k for k, v in self.id2label.items()
            }
        except (TypeError, ValueError):
            self._fail("label2id", f"values must be class indices, got {label2id!r:.200}")
        if problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"problem_type: unknown value {problem_type!r}")
        self.problem_type = problem_type

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def weights_prefix(self) -> str:
        """Prefix of the base-model weights in a classification checkpoint (HF ``base_model_prefix``)."""
        return self.model_type

    def _align_outputs(
        self, out_features: list[str] | None, out_indices: list[int] | None
    ) -> tuple[list[str], list[int]]:
        """Backbone outputs among ``self.stage_names``: HF's rule (default: last stage; either list
        determines the other)."""
        names = self.stage_names
        if out_features is not None and not (
            isinstance(out_features, list) and all(isinstance(f, str) for f in out_features)
        ):
            self._fail("out_features", f"must be a list of stage names, got {out_features!r}")
        if out_indices is not None and not _int_list(out_indices):
            self._fail("out_indices", f"must be a list of integers, got {out_indices!r}")
        if out_features is None and out_indices is None:
            return [names[-1]], [len(names) - 1]
        if out_features is not None:
            unknown = [f for f in out_features if f not in names]
            if unknown:
                self._fail("out_features", f"{unknown} not in stage_names {names}")
            indices = [names.index(f) for f in out_features]
            if out_indices is not None and list(out_indices) != indices:
                self._fail("out_indices", f"{list(out_indices)} does not match out_features {out_features}")
            return list(out_features), indices
        bad = [i for i in out_indices if not -len(names) <= i < len(names)]
        if bad:
            self._fail("out_indices", f"{bad} out of range for {len(names)} stages")
        indices = [i % len(names) for i in out_indices]
        return [names[i] for i in indices], indices

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        """Build a config from the dict of an HF ``config.json``; ValueError for anything malformed."""
        try:
            return cls(**copy.deepcopy(config))
        except (TypeError, AttributeError) as error:  # a value of an unexpected kind the checks missed
            raise ValueError(f"invalid model configuration: {error}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> ModelConfig:
        """Read ``folder/config.json`` (or a path to a JSON file); ``overrides`` replace the values read,
        as in transformers (``DinatConfig.from_pretrained(folder, num_labels=5)``)."""
        return cls.from_dict({**read_config_json(folder), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict, derived fields included."""
        data: dict[str, Any] = {"architectures": [self.architecture], **copy.deepcopy(self.extra)}
        for name in (*self.FIELDS, *self.DERIVED):
            data[name] = copy.deepcopy(getattr(self, name))
        data.update(
            model_type=self.model_type,
            id2label={str(k): v for k, v in self.id2label.items()},
            label2id=dict(self.label2id),
        )
        if self.problem_type is not None:
            data["problem_type"] = self.problem_type
        return dict(sorted(data.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/config.json`` atomically; returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / CONFIG_NAME
        write_atomic(target, self.to_json_string().encode("utf-8"))
        return target

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json_string()})"


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """The dict of ``folder/config.json`` (or of a path to a JSON file)."""
    path = Path(folder)
    if path.suffix != ".json":
        path = path / CONFIG_NAME
    return read_json_object(path, "model configuration")


class DinatConfig(ModelConfig):
    """Configuration of a DiNAT (``model_type="dinat"``) or NAT (``model_type="nat"``) model.

    Field names and defaults are those of Hugging Face ``DinatConfig``; unknown keys found in a
    ``config.json`` are kept and written back. A NAT config has no ``dilations``: every layer uses 1.
    """

    FIELDS = _DEFAULTS
    # HF derives these; a config.json carries them too, so they must not become "extra" keys.
    DERIVED = ("hidden_size", "num_layers", "stage_names")

    def __init__(
        self,
        model_type: str = "dinat",
        id2label: dict | None = None,
        label2id: dict | None = None,
        num_labels: int | None = None,
        problem_type: str | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {sorted(_MODEL_TYPES)}, got {model_type!r}")
        self.model_type = model_type
        self._set_fields(kwargs)
        if model_type == "nat" and kwargs.get("dilations") is None:
            self.dilations = _undilated(self.depths)
        self._set_labels(id2label, label2id, num_labels, problem_type)
        self._validate()
        self.out_features, self.out_indices = self._align_outputs(out_features, out_indices)

    # ---- derived fields (as HF) -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        """Width of the last stage (each patch merging doubles it)."""
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def architecture(self) -> str:
        return f"{_MODEL_TYPES[self.model_type]}ForImageClassification"

    def parameter_count(self, head: bool = True) -> int:
        """How many values the weights hold: those of DinatForImageClassification, or with ``head=False``
        those of the base model (DinatModel, DinatBackbone), which every model class needs."""
        embed, span = self.embed_dim, 2 * self.kernel_size - 1

        def conv3x3(in_channels: int, out_channels: int, bias: bool) -> int:
            return 9 * in_channels * out_channels + (out_channels if bias else 0)

        count = conv3x3(self.num_channels, embed // 2, True) + conv3x3(embed // 2, embed, True) + 2 * embed
        for stage, (dilations, heads) in enumerate(zip(self.dilations, self.num_heads, strict=True)):
            dim = embed * 2**stage
            hidden = int(self.mlp_ratio * dim)
            layer = (
                4 * dim  # the two LayerNorms
                + 4 * dim * dim + (3 * dim if self.qkv_bias else 0) + dim  # query, key, value, output
                + heads * span * span  # relative position bias
                + 2 * dim * hidden + hidden + dim  # the MLP
                + (2 * dim if self.layer_scale_init_value > 0 else 0)
            )
            count += len(dilations) * layer
            if stage < len(self.depths) - 1:
                count += conv3x3(dim, 2 * dim, False) + 4 * dim  # downsampler and its LayerNorm
        count += 2 * self.hidden_size
        if head and self.num_labels:
            count += self.num_labels * (self.hidden_size + 1)
        return count

    # ---- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"DinatConfig.{field}: {why}")

        def check_int(field: str, value: Any, low: int, high: int, what: str = "") -> None:
            if not _is_int(value) or not low <= value <= high:
                fail(field, f"{what}must be an integer from {low} to {high}, got {value!r}")

        if self.patch_size != 4:
            fail("patch_size", f"only 4 is supported (two stride-2 convolutions), got {self.patch_size}")
        check_int("num_channels", self.num_channels, 1, MAX_CHANNELS)
        check_int("embed_dim", self.embed_dim, 2, MAX_EMBED_DIM)
        if self.embed_dim % 2:
            fail("embed_dim", f"must be even, got {self.embed_dim!r}")
        if not _int_list(self.depths) or not 1 <= len(self.depths) <= MAX_STAGES:
            fail("depths",
                 f"must be a list of 1 to {MAX_STAGES} positive integers (one per stage), got {self.depths!r}")
        for stage, depth in enumerate(self.depths):
            check_int("depths", depth, 1, MAX_DEPTH, f"stage {stage}: ")
        if not _int_list(self.num_heads) or len(self.num_heads) != len(self.depths):
            fail("num_heads", f"needs one entry per stage ({len(self.depths)}), got {self.num_heads!r}")
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if heads < 1 or dim % heads:
                fail("num_heads", f"stage {stage}: dim {dim} is not divisible by {heads} heads")
        check_int("kernel_size", self.kernel_size, 1, MAX_KERNEL_SIZE)
        if self.kernel_size % 2 == 0:
            fail("kernel_size", f"must be odd, got {self.kernel_size!r}")
        if (
            not isinstance(self.dilations, list)
            or not all(_int_list(stage) for stage in self.dilations)
            or [len(stage) for stage in self.dilations] != self.depths
        ):
            fail("dilations", f"must match depths {self.depths}, got {self.dilations!r}")
        if any(not 1 <= d <= MAX_DILATION for stage in self.dilations for d in stage):
            fail("dilations", f"every dilation must be an integer from 1 to {MAX_DILATION}, got {self.dilations!r}")
        for field in ("mlp_ratio", "layer_norm_eps", "layer_scale_init_value", "initializer_range"):
            value = getattr(self, field)
            if not _is_real(value) or not math.isfinite(value):
                fail(field, f"must be a finite number, got {value!r}")
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            fail("mlp_ratio", f"must be above 0 and at most {MAX_MLP_RATIO}, got {self.mlp_ratio!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in SUPPORTED_ACTIVATIONS:
            fail("hidden_act", f"must be one of {SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}")
        if not 0 < self.layer_norm_eps <= 1:
            fail("layer_norm_eps", f"must be above 0 and at most 1, got {self.layer_norm_eps!r}")
        if self.layer_scale_init_value < 0:
            fail("layer_scale_init_value", f"must be >= 0, got {self.layer_scale_init_value!r}")
        if self.initializer_range < 0:
            fail("initializer_range", f"must be >= 0, got {self.initializer_range!r}")
        parameters = self.parameter_count()
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"DinatConfig: the configuration describes a model of {parameters:,} parameters, above the limit of "
                f"{MAX_PARAMETERS:,} (embed_dim {self.embed_dim}, depths {self.depths}, mlp_ratio {self.mlp_ratio}, "
                f"num_channels {self.num_channels}, {self.num_labels} labels)"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.model_type == "nat":
            del data["dilations"]
        data.update(out_features=list(self.out_features), out_indices=list(self.out_indices))
        return data


# JSON files dinat-np reads (config.json, preprocessor_config.json, the registry) are a few kilobytes;
# the limit keeps a huge or endless file from being read into memory.
MAX_JSON_BYTES = 32 * 1024 * 1024


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a 64-bit float")
    return value


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; FileNotFoundError or ValueError saying which ``what`` is wrong.

    NaN, Infinity and numbers that overflow a float are refused: they are not JSON, and no
    setting of a model or a transform can use them.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a JSON file") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} is larger than {MAX_JSON_BYTES:,} bytes; not a configuration file")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error})") from None
    except ValueError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def write_atomic(target: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary stream) to ``target`` through a
    temporary file in the same folder, flushed to disk, then renamed: never a half-written target."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            if callable(data):
                data(stream)
            else:
                stream.write(data)

    replace_atomically(target, write)


def replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` create a temporary file beside ``target`` (for writers that take a path), flush it
    to disk, give it the mode the umask allows, then rename it to ``target``; on failure remove it."""
    handle, temporary = make_staging_file(target, ".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        make_shareable(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    # /proc gives it without changing it; elsewhere set-and-restore, once, at import (single-threaded).
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def make_shareable(path: str | os.PathLike) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private: 0600/0700) the mode the umask allows,
    so that a model cache shared between users stays readable."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)
