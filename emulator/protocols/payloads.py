"""Payloads the probes send and the stubs serve: documents of an exact size, one home for all.

One PDF generator (``pdf``: exact size, valid xref, seeded or fresh random) behind the documents
each protocol sends (``scan_document`` FTP, ``pdf_document`` mail, ``scanned_pdf`` HTTP/SMB,
``print_document`` IPP), a PJL-wrapped print job (``print_job``), a PostScript page
(``postscript_job``), a terminal install package (``install_package``, ZIP) and PNG previews
(``make_png``/``check_png``). Random or deterministic filler makes them incompressible
like real scans, so a firewall's content inspection and a link's throughput see realistic bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
import zlib
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def noise(size: int, seed: str | None = None) -> bytes:
    """``size`` incompressible bytes: the same for the same ``seed``, fresh when None. An AES-CTR
    keystream (key from the seed, or 32 bytes of os.urandom): on the lab's kernels os.urandom and
    random.randbytes cost about 1 ms per 256 KiB, which every probe's document paid; this costs
    a tenth of that."""
    key = hashlib.sha256(seed.encode('utf-8', 'surrogatepass')).digest() if seed is not None else os.urandom(32)
    stream = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor()
    return stream.update(bytes(size)) + stream.finalize()


def postscript_job(size: int, title: str = 'safeq-lab probe') -> bytes:
    """A PostScript page of exactly ``size`` bytes: a DSC header, one line of
    text and a hex-encoded grey image of random (incompressible) samples.

    Pure ASCII, so it never contains a PJL UEL. Sizes smaller than the
    header and trailer yield a truncated header (still ``size`` bytes).
    """
    safe_title = re.sub(r'[^A-Za-z0-9 ._-]', '_', title)[:64]
    head = (b'%!PS-Adobe-3.0\n'
            b'%%Creator: safeq-lab\n'
            b'%%Title: ' + safe_title.encode('ascii') + b'\n'
            b'%%Pages: 1\n%%BoundingBox: 0 0 595 842\n%%EndComments\n'
            b'%%Page: 1 1\n'
            b'/Helvetica findfont 12 scalefont setfont\n'
            b'72 770 moveto (' + safe_title.encode('ascii') + b') show\n'
            b'gsave 72 72 translate 451 451 scale\n'
            b'/picstr 32 string def\n'
            b'256 256 8 [256 0 0 -256 0 256] {currentfile picstr readhexstring pop} image\n')
    tail = b'\ngrestore\nshowpage\n%%Trailer\n%%EOF\n'
    room = size - len(head) - len(tail)
    if room < 0:
        return (head + tail)[:size]
    full, rest = divmod(room, 65)          # 64 hex digits + newline per line
    digits = noise((full * 64 + rest) // 2 + 1).hex().encode('ascii')
    lines = [digits[i * 64:(i + 1) * 64] + b'\n' for i in range(full)]
    if rest:
        lines.append(digits[full * 64:full * 64 + rest - 1] + b'\n')
    return head + b''.join(lines) + tail


_PDF_HEADER = b'%PDF-1.4\n%\xe2\xe3\xcf\xd3\n'
_JPEG_FRAME = 4   # SOI and EOI markers around the noise of a page image


def _pdf_layout(image: bytes, text: str, pad: int) -> bytes:
    """The PDF around ``image`` (a DCT stream filling the page) and ``text`` above it, with
    ``pad`` spaces closing the trailer. Its structure depends only on len(image)."""
    shown = text.replace('\\', '\\\\').replace('(', '\\(').replace(')', '\\)').encode('latin-1', 'replace')
    drawing = b'q 595 0 0 842 0 0 cm /Im0 Do Q' + (b' BT /F1 18 Tf 72 760 Td (' + shown + b') Tj ET' if text else b'')
    fonts = b' /Font << /F1 6 0 R >>' if text else b''
    objects = [
        b'<< /Type /Catalog /Pages 2 0 R >>',
        b'<< /Type /Pages /Kids [3 0 R] /Count 1 >>',
        b'<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] '
        b'/Resources << /XObject << /Im0 4 0 R >>' + fonts + b' >> /Contents 5 0 R >>',
        b'<< /Type /XObject /Subtype /Image /Width 2480 /Height 3508 /ColorSpace /DeviceRGB '
        b'/BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n' % len(image) + image + b'\nendstream',
        b'<< /Length %d >>\nstream\n' % len(drawing) + drawing + b'\nendstream',
    ]
    if text:
        objects.append(b'<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>')
    out = bytearray(_PDF_HEADER)
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b'%d 0 obj\n' % number + body + b'\nendobj\n'
    xref = len(out)
    out += b'xref\n0 %d\n0000000000 65535 f \n' % (len(objects) + 1)
    out += b''.join(b'%010d 00000 n \n' % offset for offset in offsets)
    # The padding sits after the xref, so it does not move the startxref offset (whose digits
    # would otherwise make some sizes unreachable).
    out += b'trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n' % (len(objects) + 1, b' ' * pad, xref)
    return bytes(out)


@lru_cache(maxsize=8)
def _empty_layout(text: str) -> tuple[int, int]:
    """(bytes, xref offset) of the layout around an empty image."""
    empty = _pdf_layout(b'', text, 0)
    return len(empty), int(empty.rsplit(b'startxref\n', 1)[1].split(b'\n', 1)[0])


def _pdf_size(image_size: int, text: str) -> int:
    """len(_pdf_layout(image, text, 0)) for an image of ``image_size`` bytes, without building it
    (a scan is built once, not once per sizing round): only the /Length and startxref digits vary."""
    size, xref = _empty_layout(text)
    grown = image_size + len(str(image_size)) - 1
    return size + grown + len(str(xref + grown)) - len(str(xref))


def pdf_floor(text: str = '') -> int:
    """Bytes of the smallest PDF ``pdf`` makes with this text."""
    return len(_pdf_layout(bytes(_JPEG_FRAME), text, 0))


def pdf(size: int, *, seed: str | None = None, text: str = '') -> bytes:
    """The PDF generator: a one-page PDF of exactly ``size`` bytes whose page is a scanned image
    (a DCT stream of incompressible noise between JPEG markers), with ``text`` shown on it when
    given. Objects, xref offsets and trailer are valid, so a content-inspecting firewall sees a
    PDF as a scanner or a mail client sends it. ``seed``: the same bytes for the same (size,
    seed, text); None: fresh random bytes. ValueError below ``pdf_floor(text)``."""
    floor = pdf_floor(text)
    if size < floor:
        raise ValueError(f'a PDF needs at least {floor} B, not {size}')
    image = _JPEG_FRAME + size - floor
    pad = 0
    for _ in range(4):   # the /Length and startxref digits move with the image size; settles in <= 2 rounds
        length = _pdf_size(image, text)
        if length <= size:
            pad = size - length
            break
        image = max(_JPEG_FRAME, image - (length - size))
    room = image - _JPEG_FRAME
    filler = noise(room, f'{seed}:{text}:{size}' if seed is not None else None)
    document = _pdf_layout(b'\xff\xd8' + filler + b'\xff\xd9', text, pad)
    assert len(document) == size, (len(document), size)
    return document


@lru_cache(maxsize=1)  # the same seed gives the same bytes: a daemon sends one kind again and again
def scan_document(size: int, seed: str) -> bytes:
    """A scan as FTP stores it: deterministic, so the probe can check the sha256 of what it sent."""
    return pdf(size, seed=seed)


def pdf_document(size: int, text: str, seed: str) -> bytes:
    """A mail attachment: a page showing ``text``, deterministic; the smallest such PDF when
    ``size`` is below it."""
    return pdf(max(size, pdf_floor(text)), seed=seed, text=text)


def scanned_pdf(size: int) -> bytes:
    """A fresh random scan of exactly ``size`` bytes; below a whole PDF, its first ``size`` bytes."""
    if size < pdf_floor():
        return pdf(pdf_floor())[:size]
    return pdf(size)


def print_document(size: int, document_format: str = 'application/pdf') -> bytes:
    """``size`` bytes of job data: a scan for application/pdf, random bytes for other formats."""
    if document_format != 'application/pdf':
        return noise(size)
    return scanned_pdf(size)


@lru_cache(maxsize=1)
def install_package(size: int, seed: str) -> bytes:
    """A ZIP archive of exactly ``size`` bytes holding one stored member (a
    terminal installation package as a device's install endpoint receives it)."""
    name = b'safeq-terminal/terminal.bin'
    local = 30 + len(name)
    central = 46 + len(name)
    room = size - local - central - 22
    if room < 0:
        raise ValueError(f'an install package needs at least {size - room} B, not {size}')
    data = noise(room, seed)   # deterministic and incompressible, like a compressed package
    crc = zlib.crc32(data)

    def le(value: int, width: int) -> bytes:
        return value.to_bytes(width, 'little')

    header = (b'PK\x03\x04' + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0x21, 2)
              + le(crc, 4) + le(room, 4) + le(room, 4) + le(len(name), 2) + le(0, 2) + name)
    directory = (b'PK\x01\x02' + le(20, 2) + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 2)
                 + le(0x21, 2) + le(crc, 4) + le(room, 4) + le(room, 4) + le(len(name), 2)
                 + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(0, 4) + name)
    end = (b'PK\x05\x06' + le(0, 2) + le(0, 2) + le(1, 2) + le(1, 2)
           + le(len(directory), 4) + le(len(header) + room, 4) + le(0, 2))
    return header + data + directory + end


def print_job(size: int) -> bytes:
    """A PJL-wrapped PDF print job, exactly ``size`` bytes."""
    uel = b'\x1b%-12345X'
    head = (uel + b'@PJL JOB NAME="safeq-lab"\r\n@PJL SET USERNAME="alice"\r\n'
            b'@PJL SET DUPLEX=ON\r\n@PJL ENTER LANGUAGE=PDF\r\n')
    tail = uel + b'@PJL EOJ NAME="safeq-lab"\r\n' + uel
    pdf = scanned_pdf(max(0, size - len(head) - len(tail)))
    return (head + pdf + tail)[:size]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def make_png(width: int, height: int) -> bytes:
    """An 8-bit gray PNG of noise (stored, not deflated): about width*height bytes."""
    rows = bytearray(noise(height * (width + 1)))
    rows[::width + 1] = bytes(height)   # each row's filter byte: 0 (none)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
            + _png_chunk(b'IDAT', zlib.compress(rows, 0)) + _png_chunk(b'IEND', b''))


def check_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a well-formed PNG; ValueError saying what is wrong otherwise."""
    if not data.startswith(b'\x89PNG\r\n\x1a\n'):
        raise ValueError('not a PNG (bad signature)')
    offset, chunks, size = 8, [], None
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError('truncated PNG chunk')
        (length,) = struct.unpack('>I', data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        crc = data[offset + 8 + length:offset + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ValueError(f'truncated PNG {kind!r} chunk')
        if struct.unpack('>I', crc)[0] != zlib.crc32(kind + body):
            raise ValueError(f'PNG {kind!r} chunk CRC mismatch')
        if not chunks and kind != b'IHDR':
            raise ValueError('PNG does not start with IHDR')
        if kind == b'IHDR':
            size = struct.unpack('>II', body[:8])
        chunks.append(kind)
        offset += 12 + length
    if not chunks or chunks[-1] != b'IEND' or b'IDAT' not in chunks:
        raise ValueError('PNG lacks IDAT or does not end with IEND')
    return size


METADATA_BYTES = (40_000, 60_000)   # job metadata per job, as SafeQ's Spooler Controller links carry it


def job_metadata(name: str, owner: str, size: int, sha256: str) -> bytes:
    """The metadata a FlexiSpooler sends its Spooler Controller for one job: deterministic for the
    job, between 40 and 60 kB. Invented (SafeQ's format is proprietary): a JSON job ticket with
    one record per page (the per-page accounting data that makes real metadata this large)."""
    low, high = METADATA_BYTES
    target = low + int(sha256[:8] or '0', 16) % (high - low)
    rng = random.Random(f'{name}:{sha256}')
    head = ('{"job":{"name":' + json.dumps(name) + ',"owner":' + json.dumps(owner) + f',"bytes":{size},'
            f'"sha256":"{sha256}","format":"application/postscript"}},"pages":[')
    records, length = [], len(head) + 2
    while True:
        record = (f'{{"page":{len(records) + 1},"paper":"A4","duplex":{str(rng.random() < 0.5).lower()},'
                  f'"color":{str(rng.random() < 0.3).lower()},"coverage":[{rng.randint(0, 999)},'
                  f'{rng.randint(0, 999)},{rng.randint(0, 999)},{rng.randint(0, 999)}],'
                  f'"fingerprint":"{rng.randbytes(24).hex()}"}}')
        if length + len(record) + 1 > target:
            break
        records.append(record)
        length += len(record) + 1
    text = head + ','.join(records) + ']}'
    return (text + ' ' * (target - len(text))).encode('ascii')
