"""Attachment policies at DATA, with real MIME messages and real documents over real sockets."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.support import data
from tests.support.content import with_attachment
from tests.support.mail import client, send

PASSWORD = "Alice-pass-123"


def alice(**settings) -> int:
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD, **settings)


def submit(proxy, message: bytes) -> tuple[int, bytes]:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        return send(smtp, message)


def test_macro_workbook_is_refused_with_550_naming_it(instance, start_proxy, sink):
    alice(block_macro_attachments=True)
    code, reply = submit(start_proxy(), with_attachment("macro.xlsm"))
    assert code == 550
    assert reply.startswith(b"5.7.1") and b"macro.xlsm" in reply and b"macros" in reply
    assert sink.handler.messages == []


def test_macro_word_document_is_refused(instance, start_proxy, sink):
    alice(block_macro_attachments=True)
    code, reply = submit(start_proxy(), with_attachment("macro.doc", subtype="msword"))
    assert code == 550 and b"macro.doc" in reply
    assert sink.handler.messages == []


def test_macro_workbook_inside_a_zip_is_refused(instance, start_proxy, sink):
    alice(block_macro_attachments=True)
    code, reply = submit(start_proxy(), with_attachment("macro_xlsm.zip", subtype="zip"))
    assert code == 550 and b"macro.xlsm" in reply


def test_macro_document_is_relayed_when_blocking_is_off(instance, start_proxy, sink):
    alice(block_macro_attachments=False, block_unwanted_attachments=True)
    code, _ = submit(start_proxy(), with_attachment("macro.xlsm"))
    assert code == 250
    assert len(sink.handler.messages) == 1


def test_clean_document_is_relayed_with_every_attachment_policy_on(instance, start_proxy,
                                                                    sink):
    alice(block_macro_attachments=True, block_unwanted_attachments=True)
    code, _ = submit(start_proxy(), with_attachment("clean.docx"))
    assert code == 250
    assert b"clean.docx" in sink.handler.messages[0].data


def test_executable_named_pdf_is_refused_as_unwanted(instance, start_proxy, sink):
    alice(block_unwanted_attachments=True)
    code, reply = submit(start_proxy(), with_attachment("pe_stub.pdf", subtype="pdf"))
    assert code == 550
    assert b"pe_stub.pdf" in reply and b"potentially unwanted" in reply
    assert sink.handler.messages == []


def test_double_extension_script_in_a_zip_is_refused_as_unwanted(instance, start_proxy, sink):
    alice(block_unwanted_attachments=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("invoice.pdf.js", "WScript.Echo('hi');")
    code, reply = submit(start_proxy(), with_attachment("invoices.zip", buffer.getvalue(),
                                                        subtype="zip"))
    assert code == 550 and b"invoice.pdf.js" in reply


def test_password_protected_archive_is_refused_as_uninspectable(instance, start_proxy, sink):
    alice(block_unwanted_attachments=True)
    code, reply = submit(start_proxy(), with_attachment("encrypted.zip", subtype="zip"))
    assert code == 550 and b"password-protected" in reply


def test_zip_bomb_is_refused_as_such(instance, start_proxy, sink):
    alice(block_unwanted_attachments=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.txt", b"\0" * (60 * 1024 * 1024))
    code, reply = submit(start_proxy(), with_attachment("bomb.zip", buffer.getvalue(),
                                                        subtype="zip"))
    assert code == 550 and b"zip bomb" in reply


@pytest.mark.parametrize("setting", ["block_macro_attachments", "block_unwanted_attachments"])
def test_refused_attachment_is_not_quarantined(instance, start_proxy, sink, setting):
    from sqlalchemy import func, select

    from outgoing.models import QuarantinedMessage

    alice(**{setting: True})
    name = "macro.xlsm" if setting == "block_macro_attachments" else "pe_stub.pdf"
    assert submit(start_proxy(), with_attachment(name))[0] == 550
    assert data.query(lambda s: s.scalar(select(func.count(QuarantinedMessage.id)))) == 0
