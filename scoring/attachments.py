"""Attachment verdicts for "Block attachments with macros" and "Block potentially unwanted
attachments".

Pure: takes the raw message bytes and returns an :class:`AttachmentVerdict`; all parsing
(MIME, zip, OLE) happens in memory. It never raises: malformed MIME gets a defined verdict.

What is inspected
    Every MIME leaf part, including those inside nested ``message/rfc822`` parts, and every
    member of zip archives (zip, jar, OOXML and OpenDocument files are all zips), recursively.
    Inline ``text/*`` parts without a file name are the message body, not attachments.

Macros (``block_macros``)
    OLE documents (``.doc``/``.xls``/``.ppt`` and any OLE member of a zip, such as the
    ``vbaProject.bin`` of a ``.docm``/``.xlsm``) are given to oletools' ``VBA_Parser`` and
    count only when it recognised an Office container (``vp.type``) and found VBA or
    Excel 4 (XLM) macros. Also caught without oletools: OOXML macro sheets, OpenDocument
    Basic modules, Word 2003 XML / MHT ``editdata.mso`` and Flat OPC ``vbaProject.bin``
    payloads (oletools would inflate those without a bound), and SYLK macro sheets.
    A document oletools cannot parse is *not* a macro: Office would not run it either, and
    failing closed here would reject every slightly odd document.

Potentially unwanted (``block_unwanted``)
    By name (:data:`UNWANTED_EXTENSIONS`, last extension after stripping the trailing dots,
    blanks and invisible characters that Windows ignores, so ``invoice.pdf.exe`` and
    ``invoice.pdf.exe.`` count; every NUL-separated piece of a name is checked), by declared
    type (:data:`UNWANTED_CONTENT_TYPES`) and by real content (:data:`MAGIC_DESCRIPTIONS`:
    PE/ELF/Mach-O executables, shebang scripts, shortcuts, disk images, cabinets,
    installers, HTML applications). Password-protected content (encrypted zip members,
    encrypted Office documents) cannot be inspected and is unwanted too.

Limits (:class:`WalkLimits`, whenever either setting is on)
    A zip that would expand past the total budget, a member whose real compression ratio
    exceeds ``max_ratio`` (above ``ratio_min_bytes``), too many members or archives nested
    too deep is rejected as a zip bomb; inflation stops one byte past the bound, so a bomb is
    never expanded. Too many MIME parts or too deep MIME nesting is rejected as
    uninspectable. Zip members compressed with methods other than stored/deflate/bzip2 are
    judged by name only.

Parsing
    The standard library's parser (``scoring.mimeparse``: ``email``'s feed parser given the
    whole message, so that a body is not read line by line) with a compat32 policy that cuts
    header values at 8 KB (see :class:`_BoundedPolicy` for why not ``policy.default``). The
    walk itself is iterative.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import re
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from email.message import Message
from email.policy import Compat32

import msoffcrypto
import olefile
from oletools.olevba import TYPE_OLE, TYPE_PPT, TYPE_OpenXML, VBA_Parser

from scoring.message import decode_words, leaf_body
from scoring.mimeparse import parse_whole

REASON_MACROS = "macros"
REASON_UNWANTED = "unwanted"
REASON_ENCRYPTED = "encrypted"
REASON_ZIP_BOMB = "zip bomb"
REASON_UNINSPECTABLE = "uninspectable"
REASON_ERROR = "inspection error"

# Gmail's blocked file types and Outlook's Level-1 list, minus types mailed for ordinary work
# (certificates, Access databases, .py/.pl sources). Grouped by why they are dangerous.
UNWANTED_EXTENSIONS: frozenset[str] = frozenset({
    # Windows executables, libraries, drivers, control-panel items, screensavers
    "exe", "ex_", "com", "pif", "scr", "cpl", "dll", "ocx", "sys", "drv", "vxd", "xll",
    "msc", "gadget", "application", "appref-ms", "xbap",
    # installers and packages
    "msi", "msp", "mst", "msix", "msixbundle", "appx", "appxbundle", "msu", "apk", "xapk",
    "deb", "rpm", "pkg", "mpkg", "app", "jar", "jnlp", "class", "ins", "isp", "inf",
    "diagcab", "diagcfg", "diagpack", "cab",
    # scripts run by Windows Script Host, PowerShell, shells and HTML applications
    "bat", "cmd", "js", "jse", "mjs", "vb", "vbe", "vbs", "wsf", "wsc", "wsh", "ws",
    "ps1", "ps1xml", "ps2", "ps2xml", "psc1", "psc2", "psd1", "psm1", "msh", "msh1",
    "msh2", "mshxml", "msh1xml", "msh2xml", "sh", "csh", "ksh", "command", "hta", "htc",
    "sct", "shb", "shs", "scf", "reg", "chm", "hlp", "lib", "nsh", "prf", "grp", "its",
    # shortcuts and links that run or fetch programs
    "lnk", "url", "website", "settingcontent-ms", "library-ms", "searchconnector-ms",
    # disk images that mount and bypass Mark-of-the-Web
    "iso", "img", "vhd", "vhdx", "dmg", "udf",
    # Office add-ins and Access projects that run code on open
    "ade", "adp", "mad", "maf", "mag", "mam", "maq", "mar", "mas", "mat", "mau", "mav",
    "maw", "mda", "mde", "mdt", "mdw", "mdz", "ppa", "ppam", "xla", "xlam", "vsmacros",
})

UNWANTED_CONTENT_TYPES: frozenset[str] = frozenset({
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
    "application/x-executable", "application/x-ms-installer", "application/x-msi",
    "application/x-ms-shortcut", "application/x-sh", "application/x-csh",
    "application/x-bat", "application/bat", "application/hta", "application/x-ms-application",
    "application/vnd.ms-cab-compressed", "application/x-iso9660-image",
    "application/x-apple-diskimage", "application/java-archive",
    "application/vnd.android.package-archive", "application/x-ms-wim",
    "application/javascript", "application/x-javascript", "text/javascript",
    "text/vbscript", "application/x-vbscript",
})

# What the content sniffer reports, for the reply text.
MAGIC_DESCRIPTIONS = {
    "pe": "Windows executable",
    "elf": "ELF executable",
    "macho": "Mach-O or Java executable",
    "script": "script",
    "lnk": "Windows shortcut",
    "iso": "disk image",
    "vhd": "disk image",
    "dmg": "disk image",
    "cab": "cabinet archive",
    "msi": "Windows installer",
    "hta": "HTML application",
    "reg": "registry file",
}

_OLE_MAGIC = olefile.MAGIC
_LNK_HEADER = b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F"
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",
          b"\xca\xfe\xba\xbe")
_INSTALLER_CLSIDS = frozenset({  # MSI, MSP (patch), MST (transform)
    "000C1084-0000-0000-C000-000000000046",
    "000C1086-0000-0000-C000-000000000046",
    "000C1082-0000-0000-C000-000000000046",
})
_MACRO_OLE_TYPES = frozenset({TYPE_OLE, TYPE_OpenXML, TYPE_PPT})
_SAFE_HEADER_LEN = 8192  # longer MIME header values are not given to the policy parser
_NAME_PARAM = re.compile(r"""(?i)\b(?:file)?name\*?(?:\*\d+\*?)?\s*=\s*"?([^";\r\n]+)""")
_INVISIBLE = {"Cf", "Cc"}


@dataclass(frozen=True)
class WalkLimits:
    """Bounds on how much of a message is inspected, so inspection cost is bounded too."""

    max_mime_depth: int = 32
    max_parts: int = 500
    max_archive_depth: int = 4
    max_members: int = 1000
    max_expanded_bytes: int = 64 * 1024 * 1024
    max_ratio: int = 100
    ratio_min_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class AttachmentVerdict:
    """Whether the message is rejected, why (a ``REASON_*``), for which file, and the reply."""

    blocked: bool
    reason: str | None = None
    filename: str | None = None
    reply: str | None = None


PASSED = AttachmentVerdict(blocked=False)


def inspect_attachments(
    raw: bytes,
    *,
    block_macros: bool,
    block_unwanted: bool,
    limits: WalkLimits = WalkLimits(),
) -> AttachmentVerdict:
    """Judge every attachment of ``raw``; the first finding in message order decides.

    With both settings off nothing is parsed. An unexpected fault in a parser gives a 451
    (``REASON_ERROR``) so the sender retries rather than the mail being bounced or let through.
    """
    if not (block_macros or block_unwanted):
        return PASSED
    try:
        message = _parse(raw)
        if message is None:
            return _uninspectable("is nested too deeply to inspect")
        return _Walk(block_macros, block_unwanted, limits).message(message) or PASSED
    except RecursionError:
        return _uninspectable("is nested too deeply to inspect")
    except Exception:  # a verdict is promised for any input
        return AttachmentVerdict(True, REASON_ERROR, None,
                                 "451 4.3.0 Attachments could not be inspected; try again later")


class _BoundedPolicy(Compat32):
    """compat32 with header values cut at 8 KB when the library reads them.

    Why not ``policy.default``: its header parser is super-linear on crafted headers (a
    700 KB Content-Type of encoded words took 57 s here), and compat32's ``get_param``
    (used by the parser for the boundary) is quadratic in the number of parameters. Cutting
    what the library sees keeps parsing linear; file names are still read from the full
    raw header (see :func:`_filename`).
    """

    def header_fetch_parse(self, name: str, value: str):
        return super().header_fetch_parse(name, value[:_SAFE_HEADER_LEN])


_POLICY = _BoundedPolicy()


def _parse(raw: bytes) -> Message | None:
    """Parse the message; None when it is too deep for the parser (it recurses per level)."""
    try:
        return parse_whole(raw, _POLICY)
    except RecursionError:
        return None


def _clean(name: str | None) -> str:
    """A file name safe to put in an SMTP reply: printable ASCII, bounded length."""
    if not name:
        return "(unnamed)"
    text = "".join(c if " " <= c <= "~" else "?" for c in name).strip() or "(unnamed)"
    return text if len(text) <= 80 else text[:77] + "..."


def _verdict(reason: str, name: str, reply_tail: str) -> AttachmentVerdict:
    shown = _clean(name)
    return AttachmentVerdict(True, reason, name, f"550 5.7.1 Attachment {shown} {reply_tail}")


def _macros(name: str) -> AttachmentVerdict:
    return _verdict(REASON_MACROS, name, "contains macros; message rejected")


def _unwanted(name: str, what: str) -> AttachmentVerdict:
    return _verdict(REASON_UNWANTED, name,
                    f"is a potentially unwanted file ({what}); message rejected")


def _encrypted(name: str) -> AttachmentVerdict:
    return _verdict(REASON_ENCRYPTED, name,
                    "is password-protected and cannot be inspected; message rejected")


def _bomb(name: str, why: str) -> AttachmentVerdict:
    return _verdict(REASON_ZIP_BOMB, name, f"is a zip bomb ({why}); message rejected")


def _uninspectable(why: str) -> AttachmentVerdict:
    return AttachmentVerdict(True, REASON_UNINSPECTABLE, None,
                             f"550 5.7.1 Message {why}; message rejected")


def extension_of(name: str) -> str | None:
    """The extension Windows would act on: after dropping invisible chars and trailing dots."""
    base = re.split(r"[/\\]", name)[-1]
    base = "".join(c for c in base if unicodedata.category(c) not in _INVISIBLE)
    base = base.rstrip(". \t")
    if "." not in base:
        return None
    return base.rsplit(".", 1)[1].strip().lower() or None


def unwanted_extension(name: str | None) -> str | None:
    """The unwanted extension ``name`` ends in (checking every NUL-separated piece), if any."""
    for piece in (name or "").split("\x00"):
        ext = extension_of(piece)
        if ext in UNWANTED_EXTENSIONS:
            return ext
    return None


def sniff(data: bytes) -> str | None:
    """Identify dangerous content by its magic bytes; a key of :data:`MAGIC_DESCRIPTIONS`."""
    head = data[:64]
    if head[:2] == b"MZ" and len(data) >= 64:
        (offset,) = struct.unpack_from("<I", data, 0x3C)
        if data[offset:offset + 4] == b"PE\0\0" or data[offset:offset + 2] in (b"NE", b"LE",
                                                                            b"LX"):
            return "pe"
    if head[:4] == b"\x7fELF":
        return "elf"
    if head[:4] in _MACHO:
        return "macho"
    if head[:3] == b"#!/" or head[:4] == b"#! /":
        return "script"
    if head[:20] == _LNK_HEADER:
        return "lnk"
    if head[:8] == b"MSCF\0\0\0\0":
        return "cab"
    if head[:8] in (b"conectix", b"vhdxfile") or data[-512:-504] == b"conectix":
        return "vhd"
    if len(data) >= 512 and data[-512:-508] == b"koly":
        return "dmg"
    if any(data[at:at + 5] in (b"CD001", b"BEA01", b"NSR02") for at in (0x8001, 0x8801, 0x9001)):
        return "iso"
    if head.lstrip(b"\xef\xbb\xbf").startswith((b"Windows Registry Editor", b"REGEDIT4")):
        return "reg"
    if b"<hta:application" in data[:65536].lower():
        return "hta"
    if head[:8] == _OLE_MAGIC and _ole_clsid(data) in _INSTALLER_CLSIDS:
        return "msi"
    return None


def _ole_clsid(data: bytes) -> str | None:
    try:
        with olefile.OleFileIO(data) as ole:
            return ole.root.clsid.upper()
    except Exception:  # not a readable OLE file, so not an installer
        return None


def office_encrypted(data: bytes) -> bool:
    """True for a password-protected OLE Office document (encrypted OOXML, .doc/.xls/.ppt)."""
    if data[:8] != _OLE_MAGIC:
        return False
    try:
        return bool(msoffcrypto.OfficeFile(io.BytesIO(data)).is_encrypted())
    except Exception:  # not an Office document msoffcrypto knows
        return False


def ole_has_macros(name: str, data: bytes) -> bool:
    """VBA or XLM macros in an OLE container, per oletools; unparseable means no macros."""
    parser = None
    try:
        parser = VBA_Parser(name or "attachment", data=data)
        return parser.type in _MACRO_OLE_TYPES and bool(parser.detect_macros())
    except Exception:  # see module docstring: not parseable, not a macro
        return False
    finally:
        if parser is not None:
            with contextlib.suppress(Exception):  # closing in-memory data cannot matter
                parser.close()


def flat_document_has_macros(name: str | None, data: bytes) -> bool:
    """Macros in single-file Office formats (Word 2003 XML, Flat OPC, MHT, SYLK)."""
    ext = extension_of(name or "")
    if b"schemas.microsoft.com/office/word/2003/wordml" in data or ext in ("mht", "mhtml"):
        lowered = data.lower()
        return b"editdata.mso" in lowered or b'w:macrospresent="yes"' in lowered
    if b"schemas.microsoft.com/office/2006/xmlPackage" in data:
        return b"vbaproject.bin" in data.lower()
    if ext == "slk" or data[:3] == b"ID;":
        return any(line.startswith(b"O") and b";E" in line for line in data.splitlines())
    return False


class _Budget(Exception):
    """Raised inside the archive walk when a limit is crossed; carries the verdict."""

    def __init__(self, verdict: AttachmentVerdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class _Walk:
    """One inspection: the settings, the limits and what has been spent so far."""

    def __init__(self, block_macros: bool, block_unwanted: bool, limits: WalkLimits) -> None:
        self.block_macros = block_macros
        self.block_unwanted = block_unwanted
        self.limits = limits
        self.parts = 0
        self.members = 0
        self.expanded = 0

    def message(self, root: Message) -> AttachmentVerdict | None:
        """Depth-first over MIME parts without recursion, in message order."""
        stack: list[tuple[Message, int]] = [(root, 0)]
        while stack:
            part, depth = stack.pop()
            self.parts += 1
            if self.parts > self.limits.max_parts:
                return _uninspectable("has too many parts to inspect")
            if depth > self.limits.max_mime_depth:
                return _uninspectable("is nested too deeply to inspect")
            if part.is_multipart():  # get_payload() of a leaf decodes with its charset
                children = [p for p in part.get_payload() if isinstance(p, Message)]
                stack.extend((child, depth + 1) for child in reversed(children))
                continue
            verdict = self.leaf(part)
            if verdict is not None:
                return verdict
        return None

    def leaf(self, part: Message) -> AttachmentVerdict | None:
        name = _filename(part)
        ctype = _content_type(part)
        if name is None and ctype.startswith("text/") and _disposition(part) != "attachment":
            return None
        if self.block_unwanted and ctype in UNWANTED_CONTENT_TYPES:
            return _unwanted(_clean(name), f"declared as {ctype}")
        data = _decoded(part)
        try:
            return self.file(name, _clean(name), data, 0)
        except _Budget as over:
            return over.verdict

    def file(self, name: str | None, label: str, data: bytes,
             depth: int) -> AttachmentVerdict | None:
        """Judge one file (an attachment or an archive member) by name and content."""
        if self.block_unwanted:
            ext = unwanted_extension(name)
            if ext is not None:
                return _unwanted(label, f".{ext} file")
            kind = sniff(data)
            if kind is not None:
                return _unwanted(label, MAGIC_DESCRIPTIONS[kind])
            if office_encrypted(data):
                return _encrypted(label)
        if data[:8] == _OLE_MAGIC:
            if self.block_macros and ole_has_macros(label, data):
                return _macros(label)
            return None
        if _looks_like_zip(data):
            return self.archive(label, data, depth + 1)
        if self.block_macros and flat_document_has_macros(name, data):
            return _macros(label)
        return None

    def archive(self, label: str, data: bytes, depth: int) -> AttachmentVerdict | None:
        """Walk a zip's members within the limits; Office containers report as one file."""
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except Exception:  # not a readable zip: judged as opaque bytes
            return None
        if depth > self.limits.max_archive_depth:
            raise _Budget(_bomb(label, "archives nested too deeply"))
        self.members += len(infos)
        if self.members > self.limits.max_members:
            raise _Budget(_bomb(label, "too many archive members"))
        names = {info.filename for info in infos}
        document = "[Content_Types].xml" in names or "mimetype" in names
        if self.block_macros and document and _container_macros(names):
            return _macros(label)
        for info in infos:
            if info.filename.endswith("/"):
                continue  # a directory entry (is_dir() fails on an empty name)
            member_label = label if document else f"{label}/{info.filename}"
            ext = unwanted_extension(info.filename) if self.block_unwanted else None
            if ext is not None:
                return _unwanted(member_label, f".{ext} file")
            if info.flag_bits & 0x1:
                if self.block_unwanted:
                    return _encrypted(member_label)
                continue
            content = self.expand(label, data, info)
            if content is None:
                continue
            verdict = self.file(info.filename, member_label, content, depth)
            if verdict is not None:
                return verdict
        return None

    def expand(self, label: str, data: bytes, info: zipfile.ZipInfo) -> bytes | None:
        """Inflate one member, stopping one byte past what the limits allow."""
        limits = self.limits
        remaining = limits.max_expanded_bytes - self.expanded
        bound = min(remaining, max(limits.ratio_min_bytes, info.compress_size * limits.max_ratio))
        if info.file_size > remaining:
            raise _Budget(_bomb(label, "expands past the size limit"))
        if info.file_size > bound:
            raise _Budget(_bomb(label, "compression ratio too high"))
        raw = _member_bytes(data, info)
        if raw is None:
            return None
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                out = raw[:bound + 1]
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                out = zlib.decompressobj(-15).decompress(raw, bound + 1)
            elif info.compress_type == zipfile.ZIP_BZIP2:
                out = bz2.BZ2Decompressor().decompress(raw, bound + 1)
            else:
                return None
        except (zlib.error, OSError, EOFError, ValueError):
            return None
        if len(out) > bound:
            why = ("expands past the size limit" if len(out) > remaining
                   else "compression ratio too high")
            raise _Budget(_bomb(label, why))
        self.expanded += len(out)
        return out


def _looks_like_zip(data: bytes) -> bool:
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return True
    return b"PK\x05\x06" in data[-65557:] and zipfile.is_zipfile(io.BytesIO(data))


def _member_bytes(data: bytes, info: zipfile.ZipInfo) -> bytes | None:
    """The raw (still compressed) bytes of a member, located via its local header."""
    start = info.header_offset
    header = data[start:start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    begin = start + 30 + name_len + extra_len
    return data[begin:begin + info.compress_size]


def _container_macros(names: set[str]) -> bool:
    """OOXML macro sheets and OpenDocument Basic modules, which oletools does not report."""
    for name in names:
        lowered = name.lower()
        if "macrosheets/" in lowered:
            return True
        parts = lowered.split("/")
        if (parts[0] == "basic" and len(parts) == 3 and parts[2].endswith(".xml")
                and parts[2] not in ("script-lb.xml", "dialog-lb.xml")):
            return True
    return False


def _raw_header(part: Message, wanted: str) -> str | None:
    for key, value in part.raw_items():
        if key.lower() == wanted:
            return str(value)
    return None


def _filename(part: Message) -> str | None:
    """The attachment's file name, RFC 2231 and RFC 2047 decoded.

    Headers longer than the policy's cut are searched raw, so a name padded to megabytes
    still shows its real extension.
    """
    disposition = _raw_header(part, "content-disposition") or ""
    ctype = _raw_header(part, "content-type") or ""
    name = None
    if len(disposition) <= _SAFE_HEADER_LEN and len(ctype) <= _SAFE_HEADER_LEN:
        try:
            name = part.get_filename()
        except Exception:  # fall back to the raw header below
            name = None
    if not name:
        for raw in (disposition, ctype):
            match = _NAME_PARAM.search(raw)
            if match:
                name = match.group(1)
                break
    if not name:
        return None
    name = str(name).strip()
    if len(name) <= _SAFE_HEADER_LEN:
        name = decode_words(name)  # undecodable encoded words: judge the raw text
    return name


def _content_type(part: Message) -> str:
    raw = _raw_header(part, "content-type")
    if raw is None:
        return "text/plain"
    return raw[:_SAFE_HEADER_LEN].split(";", 1)[0].strip().lower()


def _disposition(part: Message) -> str:
    raw = _raw_header(part, "content-disposition") or ""
    return raw[:_SAFE_HEADER_LEN].split(";", 1)[0].strip().lower()


def _decoded(part: Message) -> bytes:
    """The transfer-decoded body; the raw text when decoding fails."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # lenient: inspect what is there
        data = None
    return data if isinstance(data, bytes) else leaf_body(part)
