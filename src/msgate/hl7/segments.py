"""Incremental reads of HL7 commit-journal segments (:mod:`msgate.storage.journal`) by the indexer process.

The server appends and fsyncs; the indexer process, which shares no memory with it, reads the same
segment files. :class:`SegmentReader` returns a segment's records in order, a few at a time, up to the
record count the server has announced as durable, so a record is indexed only after its ``fdatasync``
(and its ``AA``/``CA`` goes out first). The file format is the journal's: header, then
``u32 len | nonce | AES-256-GCM(raw, aad=segment name|seq)`` records.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from msgate.errors import TamperedData
from msgate.storage import crypto
from msgate.storage.journal import KIND, MAGIC, _aad  # the segment format is the journal's
from msgate.storage.keyring import KeyRing

READ_BYTES = 1 << 20
_MIN_RECORD = 28  # nonce + GCM tag


class SegmentReader:
    """Reads one segment's records in order, while its writer may still be appending.

    ``read(upto, limit)`` returns ``(seq, raw)`` for complete records with ``seq <= upto`` (None: every
    complete record in the file). A torn or not yet written tail ends the read; it is looked at again on
    the next call. A segment without a complete header (a crash while it was created) has no records.
    A record that fails authentication raises :class:`TamperedData`.
    """

    def __init__(self, path: Path, ring: KeyRing) -> None:
        self.path, self.ring = path, ring
        self.pos, self.seq = 0, 0
        self._aead: AESGCM | None = None

    def read(self, upto: int | None = None, limit: int = 1 << 30) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        if upto is not None:
            limit = min(limit, upto - self.seq)
        if limit <= 0:
            return out
        with self.path.open("rb") as handle:
            if self._aead is None and not self._header(handle):
                return out
            while len(out) < limit:
                handle.seek(self.pos)
                data = handle.read(READ_BYTES)
                used = self._records(data, out, limit, handle)
                if used == 0 and len(data) >= 4:
                    (length,) = struct.unpack_from(">I", data)
                    if length + 4 > len(data):  # one record larger than a read: take it whole
                        handle.seek(self.pos)
                        used = self._records(handle.read(length + 4), out, limit, handle)
                if used == 0:
                    break
        return out

    def _records(self, data: bytes, out: list[tuple[int, bytes]], limit: int, handle: BinaryIO) -> int:
        """Decrypt the complete records at the start of ``data`` (read at ``self.pos``) into ``out``;
        return the bytes used. A record that fails authentication and is followed by zeros is the torn
        last record of a zero-filled segment (a crash while it was written, never acknowledged)."""
        pos = 0
        while pos + 4 <= len(data) and len(out) < limit:
            (length,) = struct.unpack_from(">I", data, pos)
            body = data[pos + 4:pos + 4 + length]
            if len(body) < length or length < _MIN_RECORD:
                break
            assert self._aead is not None
            try:
                raw = self._aead.decrypt(body[:12], body[12:], _aad(self.path.name, self.seq + 1))
            except InvalidTag:
                end = pos + 4 + length
                following = data[end:end + 4]
                if len(following) < 4:
                    handle.seek(self.pos + end)
                    following = handle.read(4)
                if len(following) == 4 and not any(following):
                    break
                raise TamperedData(f"journal segment {self.path.name} record {self.seq + 1} "
                                   "failed authentication") from None
            self.seq += 1
            out.append((self.seq, raw))
            pos += 4 + length
        self.pos += pos
        return pos

    def _header(self, handle: BinaryIO) -> bool:
        data = handle.read(4096)
        try:
            if data[:4] != MAGIC:
                return False
            (klen,) = struct.unpack_from(">H", data, 4)
            kid = data[6:6 + klen].decode()
            pos = 6 + klen
            (wlen,) = struct.unpack_from(">H", data, pos)
            wrapped = data[pos + 2:pos + 2 + wlen]
        except (struct.error, UnicodeDecodeError):
            return False
        if len(wrapped) < wlen:
            return False
        dek = crypto.unwrap_key(self.ring, crypto.WrappedKey(kid, wrapped), blob_id=self.path.name, kind=KIND)
        self._aead, self.pos = AESGCM(dek), pos + 2 + wlen
        return True
