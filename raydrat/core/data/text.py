"""Text files as a stream of decoded text in bounded slices, whatever their size: bytes read
:data:`READ_BYTES` at a time, ``.gz`` decompressed member by member, decoded by the file's
byte order mark or ``data.encoding``.

* A byte order mark decides the decoding: UTF-8, UTF-16 LE/BE, UTF-32 LE/BE. A mark of
  another Unicode encoding (UTF-7, UTF-1, UTF-EBCDIC, SCSU, BOCU-1, GB-18030) is refused,
  naming it. A file without a mark is decoded as ``data.encoding`` (default ``utf-8``);
  one that is plainly UTF-16 or UTF-32 without a mark (NUL in every other byte, or three
  in four) is refused naming the encoding to set, instead of being trained on as garbage.
* Invalid bytes become U+FFFD and NUL characters too (no text holds them: a binary file, or
  a broken export); each decoded slice says whether it replaced anything.
* A gzip file is read member by member (``cat a.gz b.gz > c.gz`` is valid gzip). Bytes after
  the last complete member that do not start another one are not fatal: they are counted
  (``corrupt_bytes``) and logged, as ``gzip -t`` reports "trailing garbage ignored". A
  member that fails to decompress, or a file cut off inside one, raises
  :class:`~raydrat.core.data.sources.CorruptFile`."""

from __future__ import annotations

import codecs
import logging
import threading
import zlib
from collections.abc import Iterator

from raydrat.core.data.errors import DataError
from raydrat.core.data.sources import CorruptFile, Location, describe_os_error, filesystem, uri

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20
"""Bytes read (and, for ``.gz``, decompressed) at a time."""
SNIFF_BYTES = 4096
"""Bytes looked at to tell a file without a byte order mark that is UTF-16 or UTF-32."""
GZIP_MAGIC = b"\x1f\x8b"

BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\xfe\xff", "utf-32-be"),  # before UTF-16 LE: FF FE 00 00 starts with FF FE
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe", "utf-16-le"),
)
"""Byte order marks raydrat decodes, and the codec each selects (the mark itself is skipped)."""
UTF8_BOM = b"\xef\xbb\xbf"
WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
"""Byte order marks of UTF-16 and UTF-32 (UTF-32 LE starts with UTF-16 LE's)."""
REFUSED_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\x2b\x2f\x76", "UTF-7"),
    (b"\xf7\x64\x4c", "UTF-1"),
    (b"\xdd\x73\x66\x73", "UTF-EBCDIC"),
    (b"\x0e\xfe\xff", "SCSU"),
    (b"\xfb\xee\x28", "BOCU-1"),
    (b"\x84\x31\x95\x33", "GB-18030"),
)

_replaced = threading.local()


def _count_replacement(exc: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.count = getattr(_replaced, "count", 0) + 1
    return "\ufffd", exc.end


codecs.register_error("raydrat-replace", _count_replacement)


def _bom(head: bytes, name: str) -> tuple[str | None, int]:
    """``(codec, length of the mark)`` of the byte order mark ``head`` starts with, or
    ``(None, 0)``; a mark of an encoding raydrat does not decode is refused."""
    for mark, codec in BOMS:
        if head.startswith(mark):
            return codec, len(mark)
    for mark, label in REFUSED_BOMS:
        if head.startswith(mark):
            raise DataError(
                f"{name} starts with a {label} byte order mark: raydrat reads UTF-8, UTF-16 and UTF-32 "
                f"text; convert it (e.g. iconv -f {label} -t UTF-8) or leave it out of data.sources"
            )
    return None, 0


def _sniff_wide(head: bytes) -> str | None:
    """``utf-16-le`` / ``-be`` / ``utf-32-le`` / ``-be`` when ``head`` (without a byte order
    mark) is plainly that: mostly-ASCII text where NUL fills every other byte (UTF-16) or
    three bytes in four (UTF-32); ``None`` otherwise (a binary file's scattered NULs included)."""
    n = len(head) - len(head) % 4
    if n < 16 or head.count(0, 0, n) < n // 3:
        return None
    nul = [sum(1 for i in range(k, n, 4) if head[i] == 0) / (n // 4) for k in range(4)]
    if min(nul[1], nul[2], nul[3]) > 0.9 and nul[0] < 0.5:
        return "utf-32-le"
    if min(nul[0], nul[1], nul[2]) > 0.9 and nul[3] < 0.5:
        return "utf-32-be"
    if nul[1] > 0.8 and nul[3] > 0.8 and max(nul[0], nul[2]) < 0.5:
        return "utf-16-le"
    if nul[0] > 0.8 and nul[2] > 0.8 and max(nul[1], nul[3]) < 0.5:
        return "utf-16-be"
    return None


def gzip_members(chunks: Iterator[bytes], name: str, counts: dict) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream given as ``chunks``, member after member, at
    most :data:`READ_BYTES` at a time. Trailing bytes that do not start a member are counted
    in ``counts["corrupt_bytes"]`` and logged; a bad or cut-off member raises
    :class:`CorruptFile`."""
    it = iter(chunks)
    buf = b""
    d = None  # None: between members
    while True:
        if not buf:
            buf = next(it, b"")
            if not buf:
                if d is None:
                    return
                out = _inflate(d, b"", name)  # output the last input left pending
                if out:
                    yield out
                if d.eof:
                    d = None
                    continue
                if out:
                    continue
                raise CorruptFile(f"{name} is not a valid gzip file (it ends inside a gzip member: truncated)")
        if d is None:
            while len(buf) < len(GZIP_MAGIC) and (more := next(it, b"")):
                buf += more
            if not buf.startswith(GZIP_MAGIC):
                trailing = len(buf) + sum(len(c) for c in it)
                counts["corrupt_bytes"] = counts.get("corrupt_bytes", 0) + trailing
                log.warning(
                    "%s: %d bytes after the last gzip member are not gzip data: ignored (corrupt_bytes)", name, trailing
                )
                return
            d = zlib.decompressobj(wbits=31)
        out = _inflate(d, buf, name)
        if out:
            yield out
        if d.eof:
            buf, d = d.unused_data, None
        else:
            buf = d.unconsumed_tail


def _inflate(d, data: bytes, name: str) -> bytes:
    try:
        return d.decompress(data, READ_BYTES)
    except zlib.error as exc:
        raise CorruptFile(f"{name} is not a valid gzip file ({exc})") from None


def file_bytes(loc: Location, path: str, counts: dict) -> Iterator[bytes]:
    """The file's bytes, :data:`READ_BYTES` at a time, ``.gz`` decompressed member by member."""
    name = uri(loc, path)

    def raw() -> Iterator[bytes]:
        try:
            with filesystem(loc).open_input_stream(path, compression=None) as f:
                while chunk := f.read(READ_BYTES):
                    yield chunk
        except OSError as exc:
            raise describe_os_error(name, exc, loc) from None

    if path.endswith(".gz"):
        return gzip_members(raw(), name, counts)
    return raw()


def decoded(chunks: Iterator[bytes], name: str, encoding: str) -> Iterator[tuple[str, bool]]:
    """``(text, replaced)`` slices of the decoded ``chunks``: the byte order mark decides the
    codec, else ``encoding``; ``replaced``: the slice had invalid bytes or NUL characters,
    now U+FFFD. See the module docstring for what is refused."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= SNIFF_BYTES:
            break
    codec, skip = _bom(head, name)
    if codec is None:
        codec = encoding
        wide = _sniff_wide(head[:SNIFF_BYTES]) if codecs.lookup(encoding).name == "utf-8" else None
        if wide is not None:
            raise DataError(
                f"{name} has no byte order mark but is {wide.upper()} text (NUL in every "
                f"{'other byte' if '16' in wide else 'three bytes of four'}): set data.encoding: {wide}, "
                "or convert it to UTF-8"
            )
    decoder = codecs.getincrementaldecoder(codec)(errors="raydrat-replace")

    def piece(data: bytes, final: bool) -> tuple[str, bool]:
        _replaced.count = 0
        text = decoder.decode(data, final)
        replaced = _replaced.count > 0
        if "\x00" in text:
            text, replaced = text.replace("\x00", "\ufffd"), True
        return text, replaced

    if head[skip:]:
        yield piece(head[skip:], False)
    for chunk in chunks:
        yield piece(chunk, False)
    tail = piece(b"", True)
    if tail[0]:
        yield tail


def text_slices(loc: Location, path: str, encoding: str, counts: dict) -> Iterator[tuple[str, bool]]:
    """A text file (``.gz`` too) as decoded ``(text, replaced)`` slices (see :func:`decoded`)."""
    return decoded(file_bytes(loc, path, counts), uri(loc, path), encoding)


def decode_value(raw: bytes) -> tuple[str, bool]:
    """A ``binary`` column's value as text: UTF-8, invalid bytes and NUL replaced by U+FFFD."""
    try:
        text, replaced = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, replaced = raw.decode("utf-8", errors="replace"), True
    if "\x00" in text:
        text, replaced = text.replace("\x00", "\ufffd"), True
    return text, replaced
