"""crc32c of the checkpoint's own files (``common.pt``, object files, ``metadata.json``).

Chunk files carry tensorstore's per-inner-chunk crc32c; the ``torch.save`` files get one crc32c
each, recorded in ``metadata.json``; ``metadata.json`` carries a crc32c of its own body on its first
line, so a flipped byte anywhere fails the load naming the file.

``metadata.json`` layout: ``{\\n "crc32c": "<8 hex>",`` followed by the rest of the JSON object.
The checksum covers the file with that line removed (``{`` + what follows the comma), which is
exactly the JSON the writer serialised, so older readers (which ignore unknown fields) still read
it and the checksum never depends on re-serialising.
"""

from __future__ import annotations

import crc32c as _crc32c

_PREFIX = '{\n "crc32c": "'


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """crc32c (Castagnoli) of ``data``, continuing from ``value``; hardware-accelerated, releases the GIL."""
    return int(_crc32c.crc32c(data, value))


def seal_json(body: str) -> str:
    """``body`` (a JSON object serialised with ``indent=1``) with its crc32c as first member."""
    if not body.startswith("{\n"):
        raise ValueError("seal_json expects a JSON object serialised with indent=1")
    return f"{_PREFIX}{crc32c(body.encode('utf-8')):08x}\",{body[1:]}"


def unseal_json(text: str) -> tuple[str, int | None, int | None]:
    """Split a sealed JSON text into (body, stored crc, computed crc); crcs None when not sealed."""
    if not text.startswith(_PREFIX):
        return text, None, None
    end = len(_PREFIX) + 8
    stored_hex, rest = text[len(_PREFIX):end], text[end:]
    if not rest.startswith('",'):
        return text, -1, None  # the checksum line itself is damaged
    body = "{" + rest[2:]
    try:
        stored = int(stored_hex, 16)
    except ValueError:
        stored = -1
    return body, stored, crc32c(body.encode("utf-8"))
