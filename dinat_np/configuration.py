"""`DinatConfig`: the architecture of a DiNAT / NAT model, read from and written to HF `config.json`.

`ModelConfig` is what every configuration of the family shares (labels, problem type, backbone
outputs, unknown keys kept, `config.json` reading and writing); `configuration_family` builds the
other architectures' configs and `AutoConfig` on it."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .kernels.common import ACTIVATIONS

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

SUPPORTED_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "identity")  # what the kernels implement
_MODEL_TYPES = {"dinat": "Dinat", "nat": "Nat"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


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
        if num_labels is not None and (not _is_int(num_labels) or num_labels < 0):
            self._fail("num_labels", f"must be an integer >= 0, got {num_labels!r}")
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        self.label2id = {str(k): int(v) for k, v in label2id.items()} if label2id else {
            v: k for k, v in self.id2label.items()
        }
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
        if out_features is not None and not (isinstance(out_features, list) and all(isinstance(f, str) for f in out_features)):
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
    def from_dict(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build a config from the dict of an HF ``config.json``; ValueError for anything malformed."""
        try:
            return cls(**copy.deepcopy(config))
        except (TypeError, AttributeError) as error:  # a value of an unexpected kind the checks missed
            raise ValueError(f"invalid model configuration: {error}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ModelConfig":
        """Read ``folder/config.json`` (or a path to a JSON file)."""
        return cls.from_dict(read_config_json(folder))

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
            self.dilations = [[1] * depth for depth in self.depths] if _int_list(self.depths) else []
        self._set_labels(id2label, label2id, num_labels, problem_type)
        self._validate()
        self.out_features, self.out_indices = self._align_outputs(out_features, out_indices)

    # ---- derived fields (as HF) -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def architecture(self) -> str:
        return f"{_MODEL_TYPES[self.model_type]}ForImageClassification"

    # ---- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"DinatConfig.{field}: {why}")

        if self.patch_size != 4:
            fail("patch_size", f"only 4 is supported (two stride-2 convolutions), got {self.patch_size}")
        if not isinstance(self.num_channels, int) or self.num_channels < 1:
            fail("num_channels", f"must be a positive integer, got {self.num_channels!r}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 2 or self.embed_dim % 2:
            fail("embed_dim", f"must be a positive even integer, got {self.embed_dim!r}")
        if not _int_list(self.depths) or not self.depths or min(self.depths) < 1:
            fail("depths", f"must be a non-empty list of positive integers, got {self.depths!r}")
        if not _int_list(self.num_heads) or len(self.num_heads) != len(self.depths):
            fail("num_heads", f"needs one entry per stage ({len(self.depths)}), got {self.num_heads!r}")
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if not isinstance(heads, int) or heads < 1 or dim % heads:
                fail("num_heads", f"stage {stage}: dim {dim} is not divisible by {heads} heads")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail("kernel_size", f"must be an odd integer >= 1, got {self.kernel_size!r}")
        if (
            not isinstance(self.dilations, list)
            or not all(_int_list(stage) for stage in self.dilations)
            or [len(stage) for stage in self.dilations] != self.depths
        ):
            fail("dilations", f"must match depths {self.depths}, got {self.dilations!r}")
        if any(d < 1 for stage in self.dilations for d in stage):
            fail("dilations", f"every dilation must be an integer >= 1, got {self.dilations!r}")
        for field in ("mlp_ratio", "layer_norm_eps", "layer_scale_init_value", "initializer_range"):
            if not _is_real(getattr(self, field)):
                fail(field, f"must be a number, got {getattr(self, field)!r}")
        if self.mlp_ratio <= 0:
            fail("mlp_ratio", f"must be positive, got {self.mlp_ratio!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in SUPPORTED_ACTIVATIONS:
            fail("hidden_act", f"must be one of {SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", f"must be positive, got {self.layer_norm_eps!r}")
        if self.layer_scale_init_value < 0:
            fail("layer_scale_init_value", f"must be >= 0, got {self.layer_scale_init_value!r}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.model_type == "nat":
            del data["dilations"]
        data.update(out_features=list(self.out_features), out_indices=list(self.out_indices))
        return data


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; FileNotFoundError or ValueError saying which ``what`` is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def write_atomic(target: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary stream) to ``target`` through a
    temporary file in the same folder, flushed to disk, then renamed: never a half-written target."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            if callable(data):
                data(stream)
            else:
                stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        make_shareable(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
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
