"""`zeroserve serve --models FILE`: the models file (TOML), and the per-version engine options.

```toml
default = "smol"                 # optional: what a request without `model` gets (else the first model)
[[models]]
name = "smol"
stable = "v1"                    # optional: the first version
  [[models.versions]]
  version = "v1"
  path = "/path/model.gguf"      # GGUF file or HF folder (relative: to this file); omitted: the packaged SmolLM2
  weight = 100                   # optional: 100 for the first version, 0 for the others
  options = { max_num_seqs = 64 }  # EngineConfig field names (the serve flags without --, with _)
[[virtual]]
name = "auto"
fallback = ["smol"]
  [[virtual.rules]]
  max_prompt_tokens = 256
  model = "smol"
```

Everything is checked here, before any process starts: a mistake is a ``ModelsFileError``
naming the file and the place (``models[0].versions[1].options``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.control import FaultSpec, VirtualModel, VirtualRule

# what one engine group may set for itself; every other EngineConfig field is the server's
PER_VERSION_OPTIONS = frozenset(
    {
        "num_tokenizers", "data_parallel_size", "tensor_parallel_size", "routing", "block_size", "max_num_seqs",
        "max_num_batched_tokens", "max_model_len", "max_waiting_requests", "max_waiting_tokens",
        "enable_prefix_caching", "priority_aging_s", "target_itl_ms", "priority_deadline_ms", "dtype",
        "kv_cache_dtype", "num_kv_blocks", "kv_cache_memory_gb", "gpu_memory_utilization", "kernel_backend",
        "quantization", "enforce_eager", "load_format", "num_threads", "seed", "step_timeout_s",
    }
)  # fmt: skip
_POSITIVE = {"num_tokenizers", "data_parallel_size", "tensor_parallel_size", "block_size", "max_num_seqs",
             "max_num_batched_tokens", "max_waiting_requests", "max_waiting_tokens", "step_timeout_s"}  # fmt: skip
_NON_NEGATIVE = {"max_model_len", "num_kv_blocks", "kv_cache_memory_gb", "num_threads", "priority_aging_s",
                 "target_itl_ms"}  # fmt: skip
_ENGINE_FIELDS = {f.name: f for f in msgspec.structs.fields(EngineConfig)}
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/")
FIRST_VERSION_WEIGHT = 100


class ModelsFileError(ValueError):
    """A models file, or an admin call's version, that cannot be served; the message says where and why."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class VersionSpec:
    version: str
    path: str  # resolved: absolute, or the packaged model's
    weight: int | None = None  # None: 100 for a model's first version, 0 for later ones
    options: dict[str, Any] = field(default_factory=dict)
    fault: FaultSpec | None = None


@dataclass
class ModelSpec:
    name: str
    versions: list[VersionSpec]
    stable: str | None = None


@dataclass
class ModelsSpec:
    models: list[ModelSpec]
    virtual: list[VirtualModel] = field(default_factory=list)
    default: str | None = None


_MIRRORS: dict[type, type] = {}


def _mirror(cls: type) -> type:
    """A keyword (not array-like) copy of the control struct ``cls``, to decode a table into."""
    if cls not in _MIRRORS:
        fields = []
        for f in msgspec.structs.fields(cls):
            ftype = list[_mirror(VirtualRule)] if f.name == "rules" else f.type
            fields.append((f.name, ftype) if f.default is msgspec.NODEFAULT else (f.name, ftype, f.default))
        _MIRRORS[cls] = msgspec.defstruct(
            f"{cls.__name__}In", fields, forbid_unknown_fields=True, kw_only=True
        )
    return _MIRRORS[cls]


def from_table(data: Any, cls: type, param: str):
    """``cls`` (an array-like control struct) from a TOML/JSON table; msgspec's error names the field."""
    try:
        value = msgspec.convert(data, _mirror(cls), strict=False)
    except msgspec.ValidationError as e:
        raise ModelsFileError(f"{param}: {e}", param) from None
    out = msgspec.structs.asdict(value)
    if "rules" in out:
        out["rules"] = [VirtualRule(**msgspec.structs.asdict(r)) for r in out["rules"]]
    return cls(**out)


def check_name(value: Any, what: str, param: str) -> str:
    """A model name or version: a short word that cannot be mistaken for NAME@VERSION."""
    if not isinstance(value, str) or not value or len(value) > 128 or not set(value) <= NAME_CHARS:
        raise ModelsFileError(
            f"{what} must be a non-empty string of letters, digits and . _ - : / (no @), got {value!r}", param
        )
    return value


def check_options(options: Any, param: str = "options") -> dict[str, Any]:
    """A version's engine options: EngineConfig field names a group may set, with values of the
    field's type. Unknown names and per-server names are refused, naming each."""
    if not isinstance(options, dict):
        raise ModelsFileError(f"{param} must be a table/object of engine options", param)
    unknown = sorted(k for k in options if k not in _ENGINE_FIELDS)
    if unknown:
        raise ModelsFileError(
            f"{param}: unknown engine option(s) {', '.join(unknown)} (options are EngineConfig field names, "
            f"the serve flags without the leading -- and with _: e.g. max_num_seqs)",
            param,
        )
    server = sorted(k for k in options if k not in PER_VERSION_OPTIONS)
    if server:
        raise ModelsFileError(
            f"{param}: {', '.join(server)} cannot be set per version (the whole server's: give it on the "
            f"command line); a version may set {', '.join(sorted(PER_VERSION_OPTIONS))}",
            param,
        )
    out = {}
    for key, value in options.items():
        ftype = _ENGINE_FIELDS[key].type
        try:
            if key == "priority_deadline_ms" and isinstance(value, dict):  # TOML keys are strings
                value = {int(k): v for k, v in value.items()}
            out[key] = msgspec.convert(value, ftype, strict=False)
        except (msgspec.ValidationError, ValueError, TypeError) as e:
            raise ModelsFileError(f"{param}.{key}: {e}", f"{param}.{key}") from None
        number = out[key]
        if key in _POSITIVE and number <= 0 or key in _NON_NEGATIVE and number is not None and number < 0:
            sign = "> 0" if key in _POSITIVE else ">= 0"
            raise ModelsFileError(f"{param}.{key} must be {sign}, got {value!r}", f"{param}.{key}")
    return out


def check_fault(fault: Any, allowed: bool, param: str = "fault") -> FaultSpec | None:
    if fault is None:
        return None
    if not allowed:
        raise ModelsFileError(
            f"{param}: fault injection is off; start the server with --allow-fault-injection to use it", param
        )
    spec = from_table(fault, FaultSpec, param)
    if not 0.0 <= spec.error_rate <= 1.0 or spec.latency_ms < 0:
        raise ModelsFileError(f"{param}: error_rate must be in [0, 1] and latency_ms >= 0", param)
    return spec


def resolve_path(path: Any, base_dir: str | None, param: str = "path") -> str:
    """A GGUF file or HF folder, made absolute (relative to the models file); None: the packaged model."""
    from zeroserve.shared.model_files import ModelNotFoundError, resolve_model

    if path is not None and (not isinstance(path, str) or not path):
        raise ModelsFileError(f"{param} must be a path to a GGUF file or a Hugging Face folder", param)
    if path is not None and base_dir is not None:
        path = os.path.join(base_dir, os.path.expanduser(path))
    try:
        resolved = resolve_model(path)
    except (ModelNotFoundError, SystemExit, OSError) as e:
        raise ModelsFileError(f"{param}: {e}", param) from None
    if not os.path.exists(resolved):
        raise ModelsFileError(f"{param}: {resolved} does not exist", param)
    return os.path.abspath(resolved)


def check_weight(weight: Any, param: str = "weight") -> int | None:
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ModelsFileError(f"{param} must be an integer >= 0, got {weight!r}", param)
    return weight


def _only(table: dict, keys: set[str], where: str) -> None:
    extra = sorted(set(table) - keys)
    if extra:
        raise ModelsFileError(
            f"{where}: unknown key(s) {', '.join(extra)}; expected {', '.join(sorted(keys))}"
        )


def parse_models(data: dict, base_dir: str | None, allow_fault_injection: bool) -> ModelsSpec:
    _only(data, {"default", "models", "virtual"}, "the file")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ModelsFileError("at least one [[models]] table is needed")
    models: list[ModelSpec] = []
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(m, dict):
            raise ModelsFileError(f"{where} must be a table")
        _only(m, {"name", "stable", "versions"}, where)
        name = check_name(m.get("name"), f"{where}.name", "name")
        if any(x.name == name for x in models):
            raise ModelsFileError(f"{where}.name: model {name!r} is defined twice")
        versions_raw = m.get("versions")
        if not isinstance(versions_raw, list) or not versions_raw:
            raise ModelsFileError(f"{where} ({name}): at least one [[models.versions]] table is needed")
        versions: list[VersionSpec] = []
        for j, v in enumerate(versions_raw):
            vw = f"{where}.versions[{j}]"
            if not isinstance(v, dict):
                raise ModelsFileError(f"{vw} must be a table")
            _only(v, {"version", "path", "weight", "options", "fault"}, vw)
            try:
                version = check_name(v.get("version"), f"{vw}.version", "version")
                if any(x.version == version for x in versions):
                    raise ModelsFileError(f"{vw}.version: {name}@{version} is defined twice")
                versions.append(
                    VersionSpec(
                        version,
                        resolve_path(v.get("path"), base_dir, f"{vw}.path"),
                        check_weight(v.get("weight"), f"{vw}.weight"),
                        check_options(v.get("options", {}), f"{vw}.options"),
                        check_fault(v.get("fault"), allow_fault_injection, f"{vw}.fault"),
                    )
                )
            except ModelsFileError as e:
                raise ModelsFileError(str(e) if str(e).startswith(vw) else f"{vw}: {e}") from None
        stable = m.get("stable")
        if stable is not None and not any(v.version == stable for v in versions):
            raise ModelsFileError(f"{where}.stable: {name} has no version {stable!r}")
        models.append(ModelSpec(name, versions, stable))
    virtual = []
    names = {m.name for m in models}
    for i, raw in enumerate(data.get("virtual") or []):
        where = f"virtual[{i}]"
        vm = from_table(raw, VirtualModel, where)
        check_name(vm.name, f"{where}.name", "name")
        if vm.name in names:
            raise ModelsFileError(f"{where}.name: {vm.name!r} is already a model or virtual model")
        names.add(vm.name)
        for target in [r.model for r in vm.rules] + list(vm.fallback):
            if target.partition("@")[0] not in {m.name for m in models}:
                raise ModelsFileError(f"{where}: {target!r} is not a model of this file")
        virtual.append(vm)
    default = data.get("default")
    if default is not None and default not in names:
        raise ModelsFileError(f"default: {default!r} is not a model of this file")
    return ModelsSpec(models, virtual, default)


def read_models_file(path: str, allow_fault_injection: bool = False) -> ModelsSpec:
    """The models file at ``path``, checked; SystemExit with the reason when it is not right."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SystemExit(f"zeroserve: --models {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"zeroserve: --models {path}: not valid TOML: {e}") from None
    try:
        return parse_models(data, os.path.dirname(os.path.abspath(path)), allow_fault_injection)
    except ModelsFileError as e:
        raise SystemExit(f"zeroserve: --models {path}: {e}") from None


def first_version(path: str, allow_fault_injection: bool) -> tuple[str, str]:
    """(the default model's name, its stable version's path): what the server's own config names."""
    spec = read_models_file(path, allow_fault_injection)
    name = spec.default if spec.default in {m.name for m in spec.models} else spec.models[0].name
    model = next(m for m in spec.models if m.name == name)
    version = next((v for v in model.versions if v.version == model.stable), model.versions[0])
    return name, version.path


def single_model(name: str, path: str) -> ModelsSpec:
    """`zeroserve serve MODEL`: one model, version v1, all the traffic."""
    return ModelsSpec([ModelSpec(name, [VersionSpec("v1", path, FIRST_VERSION_WEIGHT)], "v1")])
