"""IP addresses and ranges of "Authenticating IP or Range" users, and the lookup of a client.

Accepted text: one address (IPv4 or IPv6), a CIDR block, or ``first-last`` (same family,
first <= last). Errors are ValueErrors whose message can be shown in the form as is.
``RangeIndex`` answers "which user owns this client address" with the most specific (smallest)
containing range in O(log n), however ranges nest or overlap.
"""

from __future__ import annotations

import heapq
import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MAX_TEXT = 100  # longer than any address or range; bounds work on hostile input

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_BITS = {4: 32, 6: 128}


@dataclass(frozen=True, order=True)
class IpRange:
    """A contiguous block of addresses of one family, as integers (inclusive)."""

    family: int
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.family not in _BITS:
            raise ValueError(f"IP family must be 4 or 6, not {self.family}")
        top = (1 << _BITS[self.family]) - 1
        if not 0 <= self.first <= self.last <= top:
            raise ValueError("IP range bounds out of order or out of the address space")

    @property
    def size(self) -> int:
        """Number of addresses covered."""
        return self.last - self.first + 1

    @property
    def prefixlen(self) -> int | None:
        """The CIDR prefix length when the range is exactly one CIDR block, else None."""
        size = self.size
        if size & (size - 1) or self.first % size:
            return None
        return _BITS[self.family] - (size.bit_length() - 1)

    @property
    def text(self) -> str:
        """Canonical text: "a" for one address, "a/n" for a CIDR block, else "a-b"."""
        first = _address(self.family, self.first)
        if self.first == self.last:
            return str(first)
        prefixlen = self.prefixlen
        if prefixlen is not None:
            return f"{first}/{prefixlen}"
        return f"{first}-{_address(self.family, self.last)}"

    def __str__(self) -> str:
        return self.text

    def contains(self, ip_text: str) -> bool:
        """Is this client address (text) inside the range?"""
        parsed = parse_client_ip(ip_text)
        return parsed is not None and self.family == parsed[0] and (
            self.first <= parsed[1] <= self.last
        )


def _address(family: int, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)


def _unmap(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:1.2.3.4 is the IPv4 client 1.2.3.4 seen through an IPv6 socket."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in text:
        raise ValueError(f'"{text}": zone indexes (%...) are not allowed')
    try:
        return _unmap(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f'"{text}" is not a valid IPv4 or IPv6 address') from None


def _parse_network(text: str) -> IpRange:
    address_text, _, prefix_text = text.partition("/")
    address = _parse_address(address_text.strip())
    prefix_text = prefix_text.strip()
    if not (prefix_text.isascii() and prefix_text.isdigit()) or len(prefix_text) > 3:
        raise ValueError(f'"{text}": the prefix length after / must be a number')
    prefixlen = int(prefix_text)
    raw = ipaddress.ip_address(address_text.strip())
    if raw.version == 6 and address.version == 4:
        # ::ffff:a.b.c.d/n written in IPv6 form: an IPv4 block when it stays inside ::ffff:0/96
        if prefixlen < 96:
            raise ValueError(f'"{text}" mixes IPv4-mapped and other IPv6 addresses')
        prefixlen -= 96
    bits = _BITS[address.version]
    if prefixlen > bits:
        raise ValueError(f'"{text}": an IPv{address.version} prefix is at most /{bits}')
    size = 1 << (bits - prefixlen)
    first = int(address)
    if first % size:
        network = _address(address.version, first - first % size)
        raise ValueError(
            f'"{text}" has bits set after the prefix; did you mean {network}/{prefixlen}?'
        )
    return IpRange(address.version, first, first + size - 1)


def parse_ip_range(text: str) -> IpRange:
    """Parse "IP or Range" form text into an IpRange, or raise ValueError saying why not."""
    text = (text or "").strip()
    if not text:
        raise ValueError("Enter an IP address, a CIDR block (a.b.c.0/24) or a range (a-b)")
    if len(text) > MAX_TEXT:
        raise ValueError("That is too long to be an IP address or range")
    if "/" in text and "-" in text:
        raise ValueError(f'"{text}": use either a CIDR block (a/n) or a range (a-b), not both')
    if "/" in text:
        return _parse_network(text)
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        if "-" in last_text:
            raise ValueError(f'"{text}": a range is two addresses separated by one -')
        first = _parse_address(first_text.strip())
        last = _parse_address(last_text.strip())
        if first.version != last.version:
            raise ValueError(f'"{text}": both ends of a range must be IPv4, or both IPv6')
        if int(first) > int(last):
            raise ValueError(f'"{text}": the first address is after the last one')
        return IpRange(first.version, int(first), int(last))
    address = _parse_address(text)
    return IpRange(address.version, int(address), int(address))


def validate_ip_range(text: str) -> str | None:
    """The form's check: None when valid, else the message to show."""
    try:
        parse_ip_range(text)
    except ValueError as error:
        return str(error)
    return None


def parse_client_ip(ip_text: str) -> tuple[int, int] | None:
    """(family, integer) of a client address; IPv4-mapped IPv6 becomes IPv4; None if it is
    not an IP address (e.g. a Unix socket peer)."""
    if not isinstance(ip_text, str) or len(ip_text) > MAX_TEXT:
        return None
    return _parsed(ip_text)


@lru_cache(maxsize=4096)
def _parsed(ip_text: str) -> tuple[int, int] | None:
    """Cached: a session looks its client up several times, and clients come back
    (``ipaddress`` takes microseconds per parse)."""
    try:
        address = ipaddress.ip_address(ip_text.strip().split("%", 1)[0])
    except ValueError:
        return None
    address = _unmap(address)
    return address.version, int(address)


def overlaps(a: IpRange, b: IpRange) -> bool:
    """Do two ranges share at least one address?"""
    return a.family == b.family and a.first <= b.last and b.first <= a.last


def nested(a: IpRange, b: IpRange) -> bool:
    """Does one range lie wholly inside the other (either way)? Then, inside one domain,
    the most specific decides without ambiguity."""
    return a.family == b.family and (
        (a.first <= b.first and b.last <= a.last) or (b.first <= a.first and a.last <= b.last))


def whole_space_problem(ip_range: IpRange) -> str | None:
    """Nobody may authorise every address of a family: that is an open relay."""
    if ip_range.first == 0 and ip_range.last == (1 << _BITS[ip_range.family]) - 1:
        return (f"{ip_range} is every IPv{ip_range.family} address: any host on the Internet "
                "could relay through it (an open relay). Enter the addresses of your "
                "servers.")
    return None


def width_problem(ip_range: IpRange, max_prefix: dict[int, int]) -> str | None:
    """A range wider than the customer cap (``{4: 24, 6: 48}``) is the provider's call."""
    bits = _BITS[ip_range.family]
    limit = max_prefix[ip_range.family]
    if ip_range.size > 1 << (bits - limit):
        count = f" ({1 << (bits - limit):,} addresses)" if ip_range.family == 4 else ""
        return (f"{ip_range} is wider than a /{limit}{count}, the most a customer may add. "
                "Add your servers' addresses or a smaller block, or ask your provider to "
                "add a wider one.")
    return None


class RangeIndex:
    """Client address -> owner of the most specific containing range.

    Built once per configuration change: every family's range boundaries cut the address line
    into disjoint segments, a sweep with a heap (smallest active range on top) gives each
    segment its owner, adjacent segments with the same owner merge. ``lookup`` bisects.
    Equal-sized ranges covering the same address: the lower owner id wins (stable, whatever
    the input order).
    """

    def __init__(self, entries: Iterable[tuple[IpRange, Any]]) -> None:
        by_family: dict[int, list[tuple[IpRange, Any]]] = {4: [], 6: []}
        count = 0
        for ip_range, owner in entries:
            by_family[ip_range.family].append((ip_range, owner))
            count += 1
        self._count = count
        self._tables = {family: _segments(items) for family, items in by_family.items()}

    def __len__(self) -> int:
        return self._count

    def lookup(self, ip_text: str) -> Any | None:
        """Owner of the smallest range containing the client address, or None."""
        parsed = parse_client_ip(ip_text)
        if parsed is None:
            return None
        family, value = parsed
        starts, ends, owners = self._tables[family]
        i = bisect_right(starts, value) - 1
        if i >= 0 and value <= ends[i]:
            return owners[i]
        return None


def _segments(items: list[tuple[IpRange, Any]]) -> tuple[list[int], list[int], list[Any]]:
    """Disjoint covered segments (starts, ends, owners) sorted by start."""
    starting: dict[int, list[tuple[Any, ...]]] = {}
    points = set()
    for order, (ip_range, owner) in enumerate(items):
        # Heap order: smallest range, then lowest owner, then input order (unique).
        entry = (ip_range.size, _owner_key(owner), order, ip_range.last, owner)
        starting.setdefault(ip_range.first, []).append(entry)
        points.add(ip_range.first)
        points.add(ip_range.last + 1)
    starts: list[int] = []
    ends: list[int] = []
    owners: list[Any] = []
    active: list[tuple[Any, ...]] = []
    ordered = sorted(points)
    for i, point in enumerate(ordered[:-1]):
        for entry in starting.get(point, ()):
            heapq.heappush(active, entry)
        while active and active[0][3] < point:
            heapq.heappop(active)
        if not active:
            continue
        owner = active[0][4]
        end = ordered[i + 1] - 1
        if owners and ends[-1] == point - 1 and owners[-1] == owner:
            ends[-1] = end
        else:
            starts.append(point)
            ends.append(end)
            owners.append(owner)
    return starts, ends, owners


def _owner_key(owner: Any) -> tuple[int, Any]:
    """Sort key for tie-breaking between equal-sized ranges: numbers, then by text."""
    if isinstance(owner, int) and not isinstance(owner, bool):
        return (0, owner)
    return (1, str(owner))
