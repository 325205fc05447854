"""Text cleaning and the markup parsers of the corpus sources: dictionary entries (GCIDE,
dictd), reStructuredText, POD, pod2man's roff, blank-line blocks. Each turns one text into
paragraphs of prose; none reads an archive."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

# --------------------------------------------------------------------------------------
# Cleaning


_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"[ \t\r\f\v]+")


def clean_text(s: str) -> str:
    """Unescape HTML, drop tags, NFC-normalise, collapse spaces; keeps paragraph breaks."""
    s = html.unescape(_TAG.sub(" ", s.replace("<br>", "\n")))
    s = unicodedata.normalize("NFC", s).replace("\u00a0", " ")
    lines = [_WS.sub(" ", ln).strip() for ln in s.split("\n")]
    paras, cur = [], []
    for ln in lines:
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def literal(s: str) -> str:
    """Plain text (not HTML) escaped so that :func:`clean_text`, which ``fetch`` runs on
    every document, keeps it as it is: ``a < b`` or ``<stdio.h>`` would otherwise be taken
    for tags and dropped, up to the next ``>``."""
    return html.escape(s, quote=False)


def is_prose(p: str, min_letters: float = 0.7) -> bool:
    """Whether a paragraph is mostly words: letters and spaces make up ``min_letters`` of
    it (tables, code and ASCII art that survived the markup filters are not)."""
    if not p.strip():
        return False
    return sum(c.isalpha() or c == " " for c in p) >= min_letters * len(p)


def paragraph_key(p: str) -> bytes:
    """Exact-duplicate key of a paragraph: whitespace- and case-insensitive digest."""
    return hashlib.blake2b(" ".join(p.lower().split()).encode(), digest_size=16).digest()


_GCIDE_HEAD = re.compile(r"^(\S[^\\\n]*?)\s*\\[^\\\n]*\\(.*)$")
# [=a] [^a] [a^] [~e] [-o] [th]: letters with diacritics (markers without a period: [R.]
# and [L.] are labels, removed with the other brackets)
_GCIDE_DIACRITIC = re.compile(r"\[(?:[=^~\-\"'`]?([A-Za-z]{1,2})|([A-Za-z]{1,2})[=^~\-\"'`])\]")
BRACKETED = re.compile(r"\[[^\[\]]*\]")
_PRON = re.compile(r"^\s*\([^)]*\)\s*,?")
_HEADWORD = re.compile(r"\\[^\\]*\\")  # \Lac"co*lith\: a headword with stress marks
_STRESS = re.compile(r"(?<=\w)[\"*`](?=\w)")  # Lac`co*lit"ic -> Laccolitic
# text after the last source tag is the next entry's headword, printed on the same line
_TRAILING = re.compile(r"(\[[^\[\]]*(?:Webster|WordNet|PJC)[^\[\]]*\])[^\[\]]*$")


def gcide_entry(block: str) -> str | None:
    """One dictionary entry → "Headword, pos. Definitions." with markup removed."""
    lines = block.strip("\n").split("\n")
    m = _GCIDE_HEAD.match(lines[0])
    if not m:
        return None
    head, rest = m.group(1).strip(), m.group(2)
    body = " ".join([rest, *(ln.strip() for ln in lines[1:])])
    body = _TRAILING.sub(r"\1", body)
    body = _GCIDE_DIACRITIC.sub(lambda g: g.group(1) or g.group(2), body)
    body = _STRESS.sub("", _HEADWORD.sub("", body))
    for _ in range(3):  # etymologies nest one or two levels
        body = BRACKETED.sub(" ", body)
    body = _PRON.sub("", body)
    body = body.replace("{", "").replace("}", "").replace("--", "— ")
    body = " ".join(body.split()).strip(" ,")
    if len(body.split()) < 3:
        return None
    return f"{head}, {body}"


# Technical documentation: reStructuredText (the Sphinx sources that the Python and Linux
# HTML docs ship as _sources/*.rst.txt), POD and pod2man's roff (Perl). Prose is kept;
# code, tables, images and indexes are dropped.

# directives whose body is not prose
_RST_DROP = frozenset(
    """code-block code sourcecode literalinclude include toctree image figure
    productionlist highlight doctest testcode testoutput testsetup testcleanup csv-table
    list-table flat-table table math raw index sectionauthor moduleauthor codeauthor
    currentmodule tabularcolumns graphviz digraph parsed-literal contents sectnum
    audit-event audit-event-table opcode-table kernel-doc kernel-include kernel-figure
    kernel-render kernel-abi kernel-feat maintainers-include cssclass""".split()  # noqa: SIM905
)
# directives that describe an API object: the argument (a signature, maybe continued on
# the following lines) is dropped, the body kept
_RST_SIGNATURE = frozenset(
    """function method class attribute data exception decorator decoratormethod
    classmethod staticmethod abstractmethod coroutinefunction coroutinemethod
    awaitablefunction awaitablemethod describe object cmdoption option envvar opcode
    pdbcommand 2to3fixer module program macro member type struct union enum var""".split()  # noqa: SIM905
)
# directives whose argument is text (the rest's is a version, a class name, a condition)
_RST_ARG_TEXT = frozenset(
    ["note", "warning", "tip", "hint", "important", "caution", "attention", "danger"]
    + ["error", "seealso", "centered"]
)
_RST_TITLED = frozenset(["topic", "sidebar", "rubric", "admonition"])
_RST_VERSION = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}, removed in version {}:",
}
_RST_DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::(.*)$")
_RST_ADORNMENT = re.compile(r"([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")  # under/overlines
_RST_SIMPLE_TABLE = re.compile(r"=+(?: +=+)+\s*$")
_RST_GRID = re.compile(r"[+|].*[+|]$")
_RST_OPTION = re.compile(r":[\w-]+:(?:\s|$)")
_RST_FIELD = re.compile(r":([^:`]+):\s+(.*)$")
_RST_BULLET = re.compile(r"[-*+•]\s+")
_RST_ENUM = re.compile(r"(?:\d+|#)[.)]\s+")
_RST_ROLE = re.compile(r":((?:[\w.+-]+:)+)`([^`]*)`")  # :func:`x`, :c:func:`x`
_RST_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_REF = re.compile(r"`([^`]+)`_{0,2}")
_RST_STRONG = re.compile(r"\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*")
_RST_EMPH = re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])")
_RST_FOOTREF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
_RST_TARGET = re.compile(r"(.*?)\s*<([^<>]*)>", re.S)  # `title <target>`


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _rst_target(text: str, role: str | None = None) -> str:
    m = _RST_TARGET.fullmatch(text)
    if m:
        text, role = m.group(1) or m.group(2), None if m.group(1) else role
    if role and text.startswith("~"):  # :func:`~os.path.join` shows as join
        text = text[1:].rsplit(".", 1)[-1]
    if role in _RST_ROLE_PREFIX:  # :pep:`8` shows as PEP 8, :rfc:`2822#section-3` as RFC 2822
        text = _RST_ROLE_PREFIX[role] + text.split("#")[0]
    return text.lstrip("!")


def _rst_inline(p: str) -> str:
    p = _RST_FOOTREF.sub("", p)
    p = _RST_ROLE.sub(lambda m: _rst_target(m.group(2), m.group(1)[:-1].split(":")[-1]), p)
    p = _RST_LITERAL.sub(r"\1", p)
    p = _RST_REF.sub(lambda m: _rst_target(m.group(1)), p)
    p = _RST_EMPH.sub(r"\1", _RST_STRONG.sub(r"\1", p))
    return " ".join(p.replace("\\ ", "").split())


def _rst_lines(lines: list[str]) -> list[str]:
    """The prose lines of reStructuredText, with blank lines between paragraphs."""
    out: list[str] = []
    n, i = len(lines), 0

    def block_end(j: int, ind: int) -> int:  # the first line after an indented block
        while j < n and (not lines[j].strip() or _indent(lines[j]) > ind):
            j += 1
        return j

    while i < n:
        s, ind = lines[i].strip(), _indent(lines[i])
        if not s:
            out.append("")
            i += 1
        elif s == ".." or s.startswith(".. "):  # directive, or comment/target/footnote
            end = block_end(i + 1, ind)
            m = _RST_DIRECTIVE.match(s)
            kind = m.group(1).lower().rsplit(":", 1)[-1] if m else ""
            if m and kind not in _RST_DROP:
                arg, body = m.group(2).strip(), lines[i + 1 : end]
                k = 0
                while k < len(body) and body[k].strip():  # options / signature lines
                    k += 1
                head = [h for h in body[:k] if not _RST_OPTION.match(h.strip())]
                if kind in _RST_SIGNATURE or ":" in m.group(1):
                    head, arg = [], ""
                elif kind in _RST_VERSION:
                    versions = (arg.split() + ["?", "?"])[:2]
                    arg = _RST_VERSION[kind].format(*versions)
                elif kind not in _RST_ARG_TEXT | _RST_TITLED:
                    arg = ""
                content = head + body[k:]
                dedent = min((_indent(c) for c in content if c.strip()), default=0)
                sep = [""] if kind in _RST_TITLED else []
                out += ["", *([arg] if arg else []), *sep]
                out += _rst_lines([c[dedent:] for c in content]) + [""]
            i = end
        elif s.startswith(">>>"):  # doctest: up to the next blank line
            while i < n and lines[i].strip():
                i += 1
        elif _RST_SIMPLE_TABLE.match(s):  # border, header, border, rows, border + blank
            j = i + 1
            while j < n and not (
                _RST_SIMPLE_TABLE.match(lines[j].strip())
                and (j + 1 == n or not lines[j + 1].strip())
            ):
                j += 1
            i = j + 1 if j < n else i + 1
        elif _RST_ADORNMENT.match(s) or (s[0] in "+|" and _RST_GRID.match(s)):
            i += 1
        else:
            literal = s.endswith("::")  # a literal block follows: keep the text, drop it
            if literal:
                s = s[:-2].rstrip() + ("" if s[:-2].endswith(" ") or s == "::" else ":")
            field, bullet = _RST_FIELD.match(s), _RST_BULLET.match(s)
            if field:
                out += ["", f"{field.group(1)}: {field.group(2)}"]
            elif bullet:  # each list item a paragraph ("* .. _target:" items give nothing)
                item = s[bullet.end() :]
                out += ["", "" if item.startswith("..") else item]
            elif _RST_ENUM.match(s):
                out += ["", s.removeprefix("#. ")]
            elif s:
                out.append(s)
            i += 1
            if literal:
                j = i
                while j < n and not lines[j].strip():
                    j += 1
                if j < n and _indent(lines[j]) > ind:
                    i = block_end(j, ind)
                out.append("")
    return out


def rst_prose(text: str) -> str:
    """reStructuredText (Sphinx) → paragraphs of prose, markup removed."""
    lines = _rst_lines(text.expandtabs(8).split("\n"))
    paras = (_rst_inline(" ".join(p.split("\n"))) for p in "\n".join(lines).split("\n\n"))
    return "\n\n".join(p for p in paras if is_prose(p))


_POD_OPEN = re.compile(r"([A-Z])(<+)")
_POD_COMMAND = re.compile(r"=(\w+)\s*(.*)", re.S)
_POD_ENTITY = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(code: str, inner: str) -> str:
    if code in "XZ":  # index entries, null
        return ""
    if code == "E":  # escapes: E<lt>, E<eacute>, E<0x201C>, E<233>
        if inner in _POD_ENTITY:
            return _POD_ENTITY[inner]
        try:
            return chr(int(inner, 0) if inner.startswith("0") else int(inner))
        except ValueError:
            return html.unescape(f"&{inner};")
    if code == "L":  # L<text|target>, L<name/"section">, L<url>
        text, bar, _ = inner.partition("|")
        if bar or "://" in inner:
            return text
        name, _, section = inner.partition("/")
        section = section.strip('"')
        return f'"{section}" in {name}' if name and section else section or name
    return inner  # B I C F S: bold, italic, code, file, non-breaking


def _pod_inline(s: str) -> str:
    """POD formatting codes → their text, nested codes and ``C<< a->b >>`` included."""

    def parse(i: int, close: re.Pattern | None) -> tuple[str, int]:
        buf = []
        while True:
            o = _POD_OPEN.search(s, i)
            c = close.search(s, i) if close else None
            if c and (o is None or c.start() < o.start()):
                buf.append(s[i : c.start()])
                return "".join(buf), c.end()
            if o is None:
                buf.append(s[i:])
                return "".join(buf), len(s)
            buf.append(s[i : o.start()])
            depth = len(o.group(2))
            if depth > 1 and s[o.end() : o.end() + 1].isspace():
                inner, i = parse(o.end(), re.compile(r"\s+" + ">" * depth))
            else:  # C<<x is C< followed by "<x"
                inner, i = parse(o.start() + 2, re.compile(">"))
            buf.append(_pod_code(o.group(1), inner.strip()))

    return parse(0, None)[0]


def pod_prose(text: str) -> str:
    """POD → prose paragraphs: headings, items and ordinary paragraphs with their
    formatting codes resolved; verbatim (indented) paragraphs, =begin/=end and =for
    blocks and anything after =cut up to the next command are dropped."""
    out: list[str] = []
    in_pod, in_begin = True, False
    for p in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        if not p.strip():
            continue
        cmd = _POD_COMMAND.match(p)
        if cmd:
            name, rest = cmd.group(1), cmd.group(2).strip()
            if in_begin:
                in_begin = name != "end"
            elif name == "cut":
                in_pod = False
            else:
                in_pod, in_begin = True, name == "begin"
                if name.startswith("head"):
                    out.append(rest)
                elif name == "item":
                    out.append(re.sub(r"^(?:\*|\d+\.?)\s*", "", rest))
            continue
        if in_pod and not in_begin and not p[0].isspace():
            out.append(p)
    paras = (" ".join(_pod_inline(p).split()) for p in out)
    return "\n\n".join(p for p in paras if is_prose(p))


_ROFF_ESCAPE = re.compile(
    r"\\(?:\*\((..)|\*\[([^\]]*)\]|\*(.)|\((..)|\[([^\]]*)\]|f(?:\(..|\[[^\]]*\]|.)"
    r"|s[-+]?\d|(.))"
)
_ROFF_STRINGS = {'L"': "“", 'R"': "”", "C`": '"', "C'": '"', "Aq": "'", "--": "—"}
_ROFF_STRINGS |= {"PI": "π", "C+": "C++", "Tm": "™", "Sh": "§"}
_ROFF_CHARS = {"bu": "•", "em": "—", "en": "–", "co": "©", "rg": "®", "tm": "™"}
_ROFF_CHARS |= {"aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’"}
_ROFF_CHARS |= {"hy": "-", "mi": "-", "pl": "+", "mu": "×", "de": "°", "ga": "`"}
_ROFF_CHARS |= {"Do": "$", "rs": "\\", "ti": "~", "ha": "^"}
_ROFF_PLAIN = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`"}


def _roff_escape(m: re.Match) -> str:
    s2, sn, s1, c2, cn, plain = m.groups()
    if s2 is not None or sn is not None:
        return _ROFF_STRINGS.get(s2 or sn, "")
    if c2 is not None or cn is not None:
        return _ROFF_CHARS.get(c2 or cn, "")
    if plain is not None:
        return _ROFF_PLAIN.get(plain, "")
    return ""  # \*x accent marks, \f fonts, \s sizes


def roff_prose(text: str) -> str:
    """A pod2man manual page (roff) → prose paragraphs: from the first section heading on,
    requests dropped, ``.Vb``/``.Ve`` verbatim blocks dropped, escapes resolved."""
    out: list[str] = []
    cur: list[str] = []
    started = verbatim = False
    for line in text.split("\n"):
        if line.startswith(".Vb"):
            verbatim = True
        elif line.startswith(".Ve"):
            verbatim = False
        elif verbatim:
            continue
        elif line.startswith((".SH", ".SS", ".IP")):
            started = True
            out.append(" ".join(cur))
            cur = []
            m = re.match(r'\.\w\w\s+"((?:[^"\\]|\\.)*)"|\.\w\w\s+(\S.*)', line)
            out.append((m.group(1) or m.group(2) or "") if m else "")  # heading or item tag
        elif line.startswith((".PP", ".LP", ".Sp", ".sp", ".br", ".P")) and started:
            out.append(" ".join(cur))
            cur = []
        elif started and not line.startswith((".", "'")):
            cur.append(line)
    out.append(" ".join(cur))
    paras = (" ".join(_ROFF_ESCAPE.sub(_roff_escape, p).split()) for p in out)
    return "\n\n".join(p for p in paras if is_prose(p))


# Literature


def merge_blocks(text: str, min_words: int = 60) -> list[str]:
    """Blank-line-separated blocks (a speech, a stanza, a verse paragraph) merged into
    paragraphs of at least ``min_words`` words, so that short repeated speeches ("Exit.")
    are not dropped as duplicates and verse is not cut into scraps."""
    paras, cur, words = [], [], 0
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if block:
            cur.append(block)
            words += len(block.split())
            if words >= min_words:
                paras.append(" ".join(cur))
                cur, words = [], 0
    if cur:
        paras.append(" ".join(cur))
    return paras


_DICT_LABEL = re.compile(r"^(?:<[^<>]{1,60}>\s*)+")  # FOLDOC's <category, subject>
_DICT_PRON = re.compile(r"^(?:/[^/\n]{0,40}/[,;]?\s*(?:or\s+)?)+")  # /broh'k*t/ or /..../
_DICT_XREF = re.compile(r"\{([^{}]*?)\s*(?:\(([^{}]*)\))?\}")  # {text (target)}, {(url)}
_DICT_EMPH = re.compile(r"(?<![\w_])__([A-Za-z][^_]*?)__(?![\w_])")  # __don't tell me__
# the Jargon File's usage labels, [Usenet] [very common] [Unix; common], not its
# etymologies, [from SF fandom]
_DICT_TAGS = re.compile(r"^(?:\[(?!from\b)[^\[\]\s]+(?:[ ;:,]+[^\[\]\s]+){0,2}\]\s*)+")
_DICT_DROP = re.compile(r"\[[^\[\]]*\]|\(\d{4}-\d\d-\d\d\)")  # [{Jargon File}], (2013-11-04)


def dict_entry(block: str) -> list[str]:
    """A FOLDOC / Jargon File entry → ["Headword, pos. First paragraph.", "More.", ...]:
    category labels, pronunciations, source tags and dates dropped, ``{cross references}``
    kept as plain words; redirects (entries of a few words) give nothing."""
    lines = block.strip("\n").split("\n")
    heads = []
    while lines and lines[0].strip() and not lines[0][0].isspace():
        heads.append(lines.pop(0).strip())
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    paras = [
        _DICT_EMPH.sub(r"\1", _DICT_XREF.sub(lambda m: m.group(1) or m.group(2) or "", p))
        for p in paras
        if p and not _DICT_DROP.fullmatch(p)
    ]
    if not heads or not paras:
        return []
    first = _DICT_PRON.sub("", _DICT_LABEL.sub("", paras[0])).strip()
    if len(paras) > 1 and len(first.split()) <= 3:  # the Jargon File's "n." / "adj., vt."
        paras = [f"{first} {_DICT_TAGS.sub('', paras[1])}".strip(), *paras[2:]]
    else:
        paras[0] = _DICT_TAGS.sub("", first)
    paras = [p for p in paras if is_prose(p)]  # ASCII art, tables
    if not paras or sum(len(p.split()) for p in paras) < 5:
        return []
    head = heads[0] + (f" ({', '.join(heads[1:])})" if len(heads) > 1 else "")
    return [f"{head}, {paras[0]}", *paras[1:]]
