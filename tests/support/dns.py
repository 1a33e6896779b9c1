"""A name server on loopback for tests: answers TXT queries from a dict, NXDOMAIN otherwise,
or nothing at all (a DNS outage), so "Check DNS" meets real DNS packets."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class TxtServer:
    def __init__(self):
        self.records: dict[str, list[str]] = {}
        self.silent = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopped = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def publish(self, name: str, value: str) -> None:
        self.records.setdefault(name.rstrip(".").lower(), []).append(value)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            # Long values are split into 255-byte strings, as DNS software publishes them.
            texts = [" ".join(f'"{v[i:i + 255]}"' for i in range(0, len(v), 255))
                     for v in self.records[name]]
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "TXT", *texts))
        return response

    def _serve(self) -> None:
        while not self._stopped:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            if self.silent:
                continue
            try:
                self.sock.sendto(self._answer(dns.message.from_wire(data)).to_wire(), peer)
            except Exception:  # a malformed query: no answer, as a real server might
                continue

    def start(self) -> TxtServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self.sock.close()
