"""Device personas: the typed parts of a persona, and importing them from captures of a real device.

A persona (``roles/personas.yaml`` entry, or an entry of a persona file a user gives) says who a
stub is. Besides flat strings (vendor, make_model, sys_descr, sys_object_id, ...) a printer
persona may hold:

Generated device data (types: emulator/protocols/persona_schema.py)
    ``serial_number``; ``page_count`` (prtMarkerLifeCount); ``color`` (true/false);
    ``toner``: ``"black:72 cyan:64"`` (colour:level, in ``supply_unit``, of ``toner_capacity``);
    ``supply_unit``: percent | impressions | tenthsOfGrams (default percent, capacity 100);
    ``supply_type``: toner (default) or ink;
    ``input_trays``: ``"Tray 1=500; Bypass Tray=100"`` (name=capacity in sheets, the last one
    named Bypass/Manual is a manual feed); ``document_formats`` and ``ipp_versions``: lists of
    strings. The SNMP stub builds Printer-MIB/HOST-RESOURCES rows from them, the
    IPP stub printer and marker attributes.

Imported device data (exact, from ``safeq-lab persona import``)
    ``snmp_objects``: ``{OID: {type, value}}`` served as-is by the SNMP agent (sysUpTime stays
    live). Types: integer, string (UTF-8 text), hex (octets as hex digits), oid, timeticks,
    counter32, gauge32, counter64, ipaddress, opaque (hex).
    ``ipp_attributes``: ``{name: {syntax, values}}`` served by the IPP stub, replacing the
    generated attribute of that name. ``syntax`` is the RFC 8011 name ipptool prints
    (keyword, textWithoutLanguage, enum, rangeOfInteger, ...); values are ints for
    integer/enum, booleans, ``[lower, upper]`` ranges, ``"600x600dpi"`` resolutions, strings
    otherwise. What describes the live stub rather than the captured device is never
    imported (``LIVE_IPP``: printer URIs, state, times, job counts, operations-supported: the
    stub answers only the operations it serves).

Captures read (the standard tools a person runs at the device)
    ``snmpwalk -v2c -c public -On <device> .1`` output (``.1.3.6... = TYPE: value``, multi-line
    strings and wrapped Hex-STRINGs included) or an snmpsim ``.snmprec`` file
    (``oid|tag|value``, tags 2 4 4x 6 64 65 66 67 68 70); and
    ``ipptool -tv ipp://<device>/ipp/print get-printer-attributes.test`` output (the response's
    ``name (type) = value`` lines). Bad input gives one-line errors ``file:line: what is wrong``.
    Collections (media-col-database, ...) are not imported: the stub serves its own.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulator.protocols.persona_schema import PersonaError, check_field

MAX_CAPTURE = 16 << 20       # bytes of a capture file read
MAX_LINE = 64 << 10          # longest capture line accepted
MAX_OBJECTS = 100_000        # SNMP objects one persona may hold

SNMP_TYPES = ('integer', 'string', 'hex', 'oid', 'timeticks', 'counter32', 'gauge32', 'counter64',
              'ipaddress', 'opaque')
_UNSIGNED_BITS = {'timeticks': 32, 'counter32': 32, 'gauge32': 32, 'counter64': 64}
IPP_SYNTAXES = ('textWithoutLanguage', 'nameWithoutLanguage', 'textWithLanguage', 'nameWithLanguage',
                'keyword', 'uri', 'uriScheme', 'charset', 'naturalLanguage', 'mimeMediaType', 'integer',
                'boolean', 'enum', 'rangeOfInteger', 'resolution', 'dateTime', 'octetString', 'no-value',
                'unknown')
# Attributes that describe the running stub, not the captured device (see the module docstring).
LIVE_IPP = frozenset({
    'printer-uri-supported', 'uri-security-supported', 'uri-authentication-supported', 'printer-more-info',
    'printer-uuid', 'printer-state', 'printer-state-reasons', 'printer-state-message',
    'printer-state-change-time', 'printer-state-change-date-time', 'printer-is-accepting-jobs',
    'queued-job-count', 'printer-up-time', 'printer-current-time', 'printer-config-change-time',
    'printer-config-change-date-time', 'operations-supported', 'printer-icons', 'printer-supply-info-uri',
    'device-service-count', 'printer-xri-supported', 'printer-settable-attributes-supported',
})
_OPERATION_ATTRIBUTES = {'attributes-charset', 'attributes-natural-language', 'status-message',
                         'detailed-status-message'}
SYS_UPTIME = '1.3.6.1.2.1.1.3.0'


class PersonaDataError(ValueError):
    """Persona data or a capture that cannot be used; the message is one line."""


# --- the typed persona parts -------------------------------------------------------------------

def _typed(identity: dict, key: str, default: Any) -> Any:
    """A persona field, type-checked against the schema (``default`` when absent)."""
    value = identity.get(key)
    if value is None:
        return default
    try:
        check_field(key, value, 'persona')
    except PersonaError as exc:
        raise PersonaDataError(str(exc)) from None
    return value


def structured(identity: dict, key: str) -> dict:
    """A mapping-valued persona field ({} when absent)."""
    return _typed(identity, key, {})


def flag(identity: dict, key: str, default: bool) -> bool:
    return _typed(identity, key, default)


def words(identity: dict, key: str) -> tuple[str, ...]:
    """A list-of-strings field (() when absent)."""
    return tuple(_typed(identity, key, ()))


def number(identity: dict, key: str, default: int) -> int:
    return _typed(identity, key, default)


@dataclass(frozen=True)
class Supply:
    colour: str        # 'black', 'cyan', ...
    level: int
    capacity: int
    unit: str          # Printer-MIB PrtMarkerSuppliesSupplyUnitTC name
    kind: str = 'toner'   # 'toner' or 'ink'

    @property
    def description(self) -> str:
        return f'{self.colour.title()} {"Ink" if self.kind == "ink" else "Toner"}'


@dataclass(frozen=True)
class Tray:
    name: str
    capacity: int
    manual: bool


SUPPLY_UNITS = {'impressions': 7, 'tenthsOfGrams': 13, 'percent': 19}


def supplies(identity: dict) -> list[Supply]:
    """Toner cartridges: ``toner`` "colour:level ..." (default: full black, plus CMY on colour)."""
    unit = _typed(identity, 'supply_unit', 'percent')
    if unit not in SUPPLY_UNITS:
        raise PersonaDataError(f'supply_unit: {unit!r} is not one of {", ".join(SUPPLY_UNITS)}')
    capacity = number(identity, 'toner_capacity', 100)
    kind = _typed(identity, 'supply_type', 'toner')
    if kind not in ('toner', 'ink'):
        raise PersonaDataError(f'supply_type: {kind!r} is not toner or ink')
    text = _typed(identity, 'toner', '')
    if not text:
        colours = ('black', 'cyan', 'magenta', 'yellow') if flag(identity, 'color', True) else ('black',)
        return [Supply(colour, capacity, capacity, unit, kind) for colour in colours]
    result = []
    for item in text.split():
        colour, sep, level = item.partition(':')
        if not sep or not colour or not re.fullmatch(r'-?\d+', level):
            raise PersonaDataError(f'toner: {item!r} is not colour:level')
        if not -3 <= int(level) <= capacity:
            raise PersonaDataError(f'toner: level {level} of {colour} is outside -3..{capacity}')
        result.append(Supply(colour, int(level), capacity, unit, kind))
    return result


def input_trays(identity: dict) -> list[Tray]:
    text = _typed(identity, 'input_trays', '') or 'Tray 1=500; Tray 2=500; Bypass Tray=100'
    result = []
    for item in (part.strip() for part in text.split(';')):
        name, sep, capacity = item.rpartition('=')
        if not sep or not name.strip() or not capacity.strip().isdigit():
            raise PersonaDataError(f'input_trays: {item!r} is not name=capacity')
        name = name.strip()
        result.append(Tray(name, int(capacity), bool(re.search(r'bypass|manual', name, re.I))))
    return result


def _need(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise PersonaDataError(f'{where}: {what}')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_oid(text: Any, where: str) -> str:
    _need(isinstance(text, str) and re.fullmatch(r'\d+(\.\d+)+', text.lstrip('.')) is not None,
          where, f'{text!r} is not a numeric OID')
    return text.lstrip('.')


def check_snmp_value(kind: Any, value: Any, where: str) -> None:
    _need(kind in SNMP_TYPES, where, f'type {kind!r} is not one of {", ".join(SNMP_TYPES)}')
    if kind == 'integer':
        _need(_is_int(value) and -(1 << 31) <= value < (1 << 31), where, f'{value!r} is not a 32-bit integer')
    elif kind in _UNSIGNED_BITS:
        bits = _UNSIGNED_BITS[kind]
        _need(_is_int(value) and 0 <= value < (1 << bits), where, f'{value!r} is not an unsigned {bits}-bit number')
    elif kind == 'string':
        _need(isinstance(value, str), where, f'{value!r} is not text')
    elif kind in ('hex', 'opaque'):
        _need(isinstance(value, str) and re.fullmatch(r'(?:[0-9a-fA-F]{2})*', value) is not None,
              where, f'{value!r} is not hex octets')
    elif kind == 'oid':
        check_oid(value, where)
    elif kind == 'ipaddress':
        try:
            ipaddress.IPv4Address(value)
        except (ValueError, TypeError):
            raise PersonaDataError(f'{where}: {value!r} is not an IPv4 address') from None


def snmp_objects(identity: dict) -> dict[str, dict]:
    """``snmp_objects`` validated: {OID: {'type', 'value'}}."""
    objects = structured(identity, 'snmp_objects')
    _need(len(objects) <= MAX_OBJECTS, 'snmp_objects', f'more than {MAX_OBJECTS} objects')
    checked = {}
    for oid, entry in objects.items():
        where = f'snmp_objects[{oid}]'
        oid = check_oid(oid, where)
        _need(isinstance(entry, dict) and set(entry) == {'type', 'value'}, where, 'needs exactly type and value')
        check_snmp_value(entry['type'], entry['value'], where)
        checked[oid] = entry
    return checked


def check_ipp_value(syntax: str, value: Any, where: str) -> None:
    if syntax in ('integer', 'enum'):
        _need(_is_int(value) and -(1 << 31) <= value < (1 << 31), where, f'{value!r} is not a 32-bit integer')
    elif syntax == 'boolean':
        _need(isinstance(value, bool), where, f'{value!r} is not true or false')
    elif syntax == 'rangeOfInteger':
        _need(isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value))
              and value[0] <= value[1], where, f'{value!r} is not [lower, upper]')
    elif syntax == 'resolution':
        _need(isinstance(value, str) and _RESOLUTION.fullmatch(value) is not None,
              where, f'{value!r} is not like 600x600dpi')
    else:
        _need(isinstance(value, str) and len(value.encode()) < 1024, where, f'{value!r} is not text under 1 KiB')


def ipp_attributes(identity: dict) -> dict[str, dict]:
    """``ipp_attributes`` validated: {name: {'syntax', 'values'}}, live attributes left out."""
    checked = {}
    for name, entry in structured(identity, 'ipp_attributes').items():
        where = f'ipp_attributes[{name}]'
        _need(isinstance(name, str) and re.fullmatch(r'[a-z][a-z0-9-]*', name) is not None, where,
              'attribute names are lower-case keywords')
        _need(isinstance(entry, dict) and set(entry) == {'syntax', 'values'}, where,
              'needs exactly syntax and values')
        syntax, values = entry['syntax'], entry['values']
        _need(syntax in IPP_SYNTAXES, where, f'syntax {syntax!r} is not one of {", ".join(IPP_SYNTAXES)}')
        _need(isinstance(values, list) and (values or syntax in ('no-value', 'unknown')), where,
              'values must be a non-empty list')
        for value in values:
            check_ipp_value(syntax, value, where)
        if name not in LIVE_IPP:
            checked[name] = {'syntax': syntax, 'values': list(values)}
    return checked


# --- reading captures --------------------------------------------------------------------------

class _Lines:
    """Numbered lines of a capture file, bounded."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            with open(path, 'rb') as handle:
                raw = handle.read(MAX_CAPTURE + 1)
        except OSError as exc:
            raise PersonaDataError(f'{path}: cannot read ({exc.strerror or type(exc).__name__})') from None
        if len(raw) > MAX_CAPTURE:
            raise PersonaDataError(f'{path}: larger than {MAX_CAPTURE >> 20} MiB')
        self.lines = raw.decode('utf-8', 'replace').splitlines()
        for number, line in enumerate(self.lines, 1):
            if len(line) > MAX_LINE:
                raise self.error(number, f'line longer than {MAX_LINE} characters')

    def error(self, number: int, what: str) -> PersonaDataError:
        return PersonaDataError(f'{self.path}:{number}: {what}')


_WALK_LINE = re.compile(r'^(\S+)\s+=\s+(.*)$')
_WALK_SKIP = ('No Such Object', 'No Such Instance', 'No more variables')
_HEX_BYTES = re.compile(r'^(?:[0-9A-Fa-f]{2}\s*)*$')


def _unquote(text: str) -> str | None:
    """The body of a net-snmp quoted STRING (\\" and \\\\ escaped), None if not closed yet."""
    if len(text) < 2 or not text.endswith('"'):
        return None
    body = text[1:-1]
    if len(re.search(r'\\*$', body).group(0)) % 2:   # the closing quote is escaped
        return None
    return re.sub(r'\\(.)', r'\1', body)


def _leading_int(text: str, lines: _Lines, number: int) -> int:
    match = re.search(r'\((-?\d+)\)', text) or re.match(r'\s*(-?\d+)', text)
    if match is None:
        raise lines.error(number, f'{text[:40]!r} holds no number')
    return int(match.group(1))


def _octets(data: bytes) -> dict:
    """Printable UTF-8 as a string, anything else as hex: both serve the same octets."""
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in '\r\n\t' for ch in text):
        return {'type': 'string', 'value': text}
    return {'type': 'hex', 'value': data.hex()}


def _walk_value(kind: str, text: str, lines: _Lines, number: int) -> dict | None:
    if kind == 'STRING':
        body = _unquote(text) if text.startswith('"') else text
        if body is None:
            raise lines.error(number, 'STRING value without its closing quote')
        return {'type': 'string', 'value': body}
    if kind in ('Hex-STRING', 'BITS'):
        octets = re.match(r'^((?:[0-9A-Fa-f]{2}\s*)*)', text).group(1)
        return _octets(bytes.fromhex(octets.replace(' ', '')))
    if kind == 'INTEGER':
        return {'type': 'integer', 'value': _leading_int(text, lines, number)}
    if kind in ('Counter32', 'Gauge32', 'Counter64', 'Timeticks', 'UInteger32', 'Unsigned32'):
        kind_name = {'UInteger32': 'gauge32', 'Unsigned32': 'gauge32'}.get(kind, kind.lower())
        return {'type': kind_name, 'value': _leading_int(text, lines, number)}
    if kind == 'OID':
        if not re.fullmatch(r'\.?\d+(\.\d+)*', text.strip()):
            raise lines.error(number, f'OID value {text.strip()[:60]!r} is not numeric: capture with snmpwalk -On')
        return {'type': 'oid', 'value': text.strip().lstrip('.')}
    if kind == 'IpAddress':
        return {'type': 'ipaddress', 'value': text.strip()}
    if kind == 'Network Address':
        parts = text.strip().split(':')
        return {'type': 'ipaddress', 'value': '.'.join(str(int(part, 16)) for part in parts)}
    if kind == 'NULL':
        return None
    raise lines.error(number, f'unsupported type {kind!r}')


def parse_walk(path: str | Path) -> dict[str, dict]:
    """``snmpwalk -On`` output -> {OID: {type, value}}."""
    lines = _Lines(path)
    objects: dict[str, dict] = {}
    pending: tuple[int, str, str, str] | None = None   # a value continued on the next lines

    def finish(start: int, oid: str, kind: str, text: str) -> None:
        try:
            value = _walk_value(kind, text, lines, start)
        except ValueError as exc:
            raise lines.error(start, f'bad {kind} value: {exc}') from None
        if value is not None:
            check_snmp_value(value['type'], value['value'], f'{lines.path}:{start}')
            objects[oid] = value

    for number, line in enumerate(lines.lines, 1):
        match = _WALK_LINE.match(line)
        if pending is not None and (match is None or not match.group(1).lstrip('.')[:1].isdigit()):
            start, oid, kind, text = pending
            if kind == 'STRING':
                text += '\n' + line
                if _unquote(text) is not None:
                    pending = None
                    finish(start, oid, kind, text)
                else:
                    pending = (start, oid, kind, text)
                continue
            if _HEX_BYTES.match(line.strip()):   # a wrapped Hex-STRING
                pending = (start, oid, kind, text + ' ' + line.strip())
                continue
        if pending is not None:
            finish(*pending)
            pending = None
        if not line.strip():
            continue
        if match is None:
            raise lines.error(number, 'not "OID = TYPE: value" (capture with snmpwalk -On)')
        oid_text, value_text = match.groups()
        if not re.fullmatch(r'\.?\d+(\.\d+)+', oid_text):
            raise lines.error(number, f'OID {oid_text[:60]!r} is not numeric: capture with snmpwalk -On')
        oid = oid_text.lstrip('.')
        if value_text.startswith(_WALK_SKIP):
            continue
        if value_text == '""':
            objects[oid] = {'type': 'string', 'value': ''}
            continue
        kind, sep, text = value_text.partition(': ')
        if not sep:
            kind, text = value_text.rstrip(':'), ''
        text = text.rstrip('\r')
        if kind == 'STRING' and text.startswith('"') and _unquote(text) is None:
            pending = (number, oid, kind, text)
        elif kind in ('Hex-STRING', 'BITS'):
            pending = (number, oid, kind, text)
        else:
            finish(number, oid, kind, text)
    if pending is not None:
        finish(*pending)
    return _bounded(objects, lines)


_SNMPREC_TAGS = {'2': 'integer', '4': 'string', '6': 'oid', '64': 'ipaddress', '65': 'counter32',
                 '66': 'gauge32', '67': 'timeticks', '68': 'opaque', '70': 'counter64'}


def parse_snmprec(path: str | Path) -> dict[str, dict]:
    """snmpsim ``.snmprec`` (``oid|tag|value``) -> {OID: {type, value}}."""
    lines = _Lines(path)
    objects: dict[str, dict] = {}
    for number, line in enumerate(lines.lines, 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        parts = line.split('|', 2)
        if len(parts) != 3:
            raise lines.error(number, 'not "oid|tag|value"')
        oid_text, tag, text = parts
        if not re.fullmatch(r'\.?\d+(\.\d+)+', oid_text):
            raise lines.error(number, f'{oid_text[:60]!r} is not a numeric OID')
        if ':' in tag:
            raise lines.error(number, f'tag {tag!r} uses an snmpsim variation module: record the values')
        hexed = tag.endswith('x')
        base = tag[:-1] if hexed else tag
        if base == '5':   # NULL
            continue
        if base not in _SNMPREC_TAGS:
            raise lines.error(number, f'unknown tag {tag!r} (expected one of {", ".join(_SNMPREC_TAGS)}, '
                                      f'optionally with x)')
        kind = _SNMPREC_TAGS[base]
        try:
            raw = bytes.fromhex(text) if hexed else text.encode('utf-8')
        except ValueError:
            raise lines.error(number, f'{text[:40]!r} is not hex') from None
        if kind == 'string':
            value = _octets(raw)
        elif kind == 'opaque':
            value = {'type': 'opaque', 'value': raw.hex()}
        elif kind == 'ipaddress' and hexed:
            value = {'type': kind, 'value': str(ipaddress.IPv4Address(raw)) if len(raw) == 4 else raw.hex()}
        elif kind in ('oid', 'ipaddress'):
            value = {'type': kind, 'value': raw.decode('ascii', 'replace').lstrip('.')}
        else:
            if not re.fullmatch(r'-?\d+', raw.decode('ascii', 'replace')):
                raise lines.error(number, f'{kind} value {text[:40]!r} is not a number')
            value = {'type': kind, 'value': int(raw)}
        check_snmp_value(value['type'], value['value'], f'{lines.path}:{number}')
        objects[oid_text.lstrip('.')] = value
    return _bounded(objects, lines)


def _bounded(objects: dict, lines: _Lines) -> dict:
    if not objects:
        raise PersonaDataError(f'{lines.path}: no SNMP objects found')
    if len(objects) > MAX_OBJECTS:
        raise PersonaDataError(f'{lines.path}: more than {MAX_OBJECTS} objects')
    return dict(sorted(objects.items(), key=lambda item: tuple(int(p) for p in item[0].split('.'))))


def parse_snmp_capture(path: str | Path) -> dict[str, dict]:
    """A walk or an snmprec file, told apart by their first data line."""
    for line in _Lines(path).lines:
        if line.strip() and not line.lstrip().startswith('#'):
            return parse_snmprec(path) if re.match(r'^\.?\d[\d.]*\|', line) else parse_walk(path)
    raise PersonaDataError(f'{path}: empty capture')


# ipptool prints enums by name (CUPS ippEnumString); unknown ones as numbers.
_ENUMS = {
    'finishings': {'none': 3, 'staple': 4, 'punch': 5, 'cover': 6, 'bind': 7, 'saddle-stitch': 8,
                   'edge-stitch': 9, 'fold': 10, 'trim': 11, 'bale': 12, 'booklet-maker': 13,
                   'jog-offset': 14, 'coat': 15, 'laminate': 16, 'staple-top-left': 20,
                   'staple-bottom-left': 21, 'staple-top-right': 22, 'staple-bottom-right': 23,
                   'edge-stitch-left': 24, 'edge-stitch-top': 25, 'edge-stitch-right': 26,
                   'edge-stitch-bottom': 27, 'staple-dual-left': 28, 'staple-dual-top': 29,
                   'staple-dual-right': 30, 'staple-dual-bottom': 31, 'staple-triple-left': 32,
                   'staple-triple-top': 33, 'staple-triple-right': 34, 'staple-triple-bottom': 35,
                   'bind-left': 50, 'bind-top': 51, 'bind-right': 52, 'bind-bottom': 53,
                   'trim-after-pages': 60, 'trim-after-documents': 61, 'trim-after-copies': 62,
                   'trim-after-job': 63, 'punch-top-left': 70, 'punch-bottom-left': 71,
                   'punch-top-right': 72, 'punch-bottom-right': 73, 'punch-dual-left': 74,
                   'punch-dual-top': 75, 'punch-dual-right': 76, 'punch-dual-bottom': 77,
                   'punch-triple-left': 78, 'punch-triple-top': 79, 'punch-triple-right': 80,
                   'punch-triple-bottom': 81, 'punch-quad-left': 82, 'punch-quad-top': 83,
                   'punch-quad-right': 84, 'punch-quad-bottom': 85, 'fold-accordion': 90,
                   'fold-double-gate': 91, 'fold-gate': 92, 'fold-half': 93, 'fold-half-z': 94,
                   'fold-left-gate': 95, 'fold-letter': 96, 'fold-parallel': 97, 'fold-poster': 98,
                   'fold-right-gate': 99, 'fold-z': 100},
    'orientation-requested': {'portrait': 3, 'landscape': 4, 'reverse-landscape': 5,
                              'reverse-portrait': 6, 'none': 7},
    'print-quality': {'draft': 3, 'normal': 4, 'high': 5},
    'printer-state': {'idle': 3, 'processing': 4, 'stopped': 5},
    'job-state': {'pending': 3, 'pending-held': 4, 'processing': 5, 'processing-stopped': 6,
                  'canceled': 7, 'aborted': 8, 'completed': 9},
}
_RESOLUTION = re.compile(r'(\d+)(?:x(\d+))?(dpi|dpcm)')
_IPP_LINE = re.compile(r'^\s+([a-z][a-z0-9-]*) \((1setOf )?([A-Za-z-]+)\) = ?(.*)$')


def _enum_table(name: str) -> dict[str, int]:
    base = re.sub(r'-(default|supported|ready|actual)$', '', name)
    return _ENUMS.get(base, {})


def _ipp_value(name: str, syntax: str, text: str, lines: _Lines, number: int):
    if syntax in ('integer', 'enum'):
        if re.fullmatch(r'-?\d+', text):
            return int(text)
        if re.fullmatch(r'0x[0-9a-fA-F]+', text):
            return int(text, 16)
        table = _enum_table(name) if syntax == 'enum' else {}
        if text not in table:
            raise lines.error(number, f'{name}: {syntax} value {text!r} is not a number or a known name')
        return table[text]
    if syntax == 'boolean':
        if text not in ('true', 'false'):
            raise lines.error(number, f'{name}: boolean value {text!r} is not true or false')
        return text == 'true'
    if syntax == 'rangeOfInteger':
        match = re.fullmatch(r'(-?\d+)-(-?\d+)', text)
        if match is None:
            raise lines.error(number, f'{name}: rangeOfInteger {text!r} is not lower-upper')
        return [int(match.group(1)), int(match.group(2))]
    if syntax == 'resolution':
        match = _RESOLUTION.fullmatch(text)
        if match is None:
            raise lines.error(number, f'{name}: resolution {text!r} is not like 600dpi or 600x1200dpi')
        x, y, units = match.groups()
        return f'{x}x{y or x}{units}'
    return text


def _split_values(text: str) -> list[str]:
    """ipptool's comma-separated 1setOf values (a backslash escapes a comma)."""
    values, current, escaped = [], '', False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == '\\':
            escaped = True
        elif ch == ',':
            values.append(current)
            current = ''
        else:
            current += ch
    return values + [current]


def parse_ipptool(path: str | Path) -> tuple[dict[str, dict], list[str]]:
    """The first response of an ``ipptool -tv`` capture -> ({name: {syntax, values}}, notes)."""
    lines = _Lines(path)
    attributes: dict[str, dict] = {}
    notes: list[str] = []
    start = next((n for n, line in enumerate(lines.lines, 1) if line.strip().startswith('RECEIVED:')), None)
    if start is None:
        raise PersonaDataError(f'{lines.path}: no "RECEIVED: ... bytes in response" line: '
                               f'capture with ipptool -tv')
    for number in range(start + 1, len(lines.lines) + 1):
        line = lines.lines[number - 1]
        if not line.strip():
            continue
        if not line.startswith('        '):   # the next test or the summary: the response ended
            break
        stripped = line.strip()
        if stripped.startswith('status-code = '):
            status = stripped.split('= ', 1)[1].split(' ')[0]
            if not status.startswith('successful-ok'):
                raise lines.error(number, f'the device answered {status}, not successful-ok')
            continue
        match = _IPP_LINE.match(line)
        if match is None:
            raise lines.error(number, 'not "name (type) = value"')
        name, set_of, syntax, text = match.groups()
        if name in _OPERATION_ATTRIBUTES or name in LIVE_IPP:
            continue
        if syntax == 'collection':
            notes.append(f'{name}: collection not imported')
            continue
        if syntax not in IPP_SYNTAXES:
            raise lines.error(number, f'{name}: unknown syntax {syntax!r}')
        if syntax in ('no-value', 'unknown'):
            attributes[name] = {'syntax': syntax, 'values': []}
            continue
        parts = _split_values(text) if set_of else [text]
        values = [_ipp_value(name, syntax, part, lines, number) for part in parts]
        for value in values:
            check_ipp_value(syntax, value, f'{lines.path}:{number}: {name}')
        attributes[name] = {'syntax': syntax, 'values': values}
    if not attributes:
        raise PersonaDataError(f'{lines.path}: the response holds no printer attributes')
    return attributes, notes


# --- building a persona ------------------------------------------------------------------------

_SYS_DESCR, _SYS_OBJECT_ID = '1.3.6.1.2.1.1.1.0', '1.3.6.1.2.1.1.2.0'
_HR_DEVICE_DESCR = '1.3.6.1.2.1.25.3.2.1.3.1'
_PRT_SERIAL = '1.3.6.1.2.1.43.5.1.1.17.1'


def _text_of(objects: dict, oid: str) -> str:
    entry = objects.get(oid)
    return entry['value'] if entry and entry['type'] == 'string' else ''


def import_persona(walk_path: str | Path | None, ipp_path: str | Path | None, name: str,
                   vendor: str | None = None) -> dict:
    """{name: persona entry} from an SNMP capture and/or an ipptool capture (one is enough)."""
    if not re.fullmatch(r'[A-Za-z0-9][\w.-]*', name or ''):
        raise PersonaDataError(f'persona name {name!r}: use letters, digits, . _ -')
    if walk_path is None and ipp_path is None:
        raise PersonaDataError('give an SNMP capture (snmpwalk -On or .snmprec), an ipptool capture, or both')
    objects = parse_snmp_capture(walk_path) if walk_path is not None else {}
    attributes, _notes = parse_ipptool(ipp_path) if ipp_path is not None else ({}, [])
    make_model = ((attributes.get('printer-make-and-model') or {}).get('values') or [''])[0] \
        or _text_of(objects, _HR_DEVICE_DESCR) or _text_of(objects, _SYS_DESCR)
    device_id = ((attributes.get('printer-device-id') or {}).get('values') or [''])[0]
    manufacturer = re.search(r'(?:MFG|MANUFACTURER):([^;]+)', device_id)
    entry: dict[str, Any] = {
        'vendor': vendor or (manufacturer.group(1).strip() if manufacturer else make_model.split(' ')[0]),
        'make_model': make_model or name,
    }
    if _text_of(objects, _SYS_DESCR):
        entry['sys_descr'] = _text_of(objects, _SYS_DESCR)
    if objects.get(_SYS_OBJECT_ID, {}).get('type') == 'oid':
        entry['sys_object_id'] = objects[_SYS_OBJECT_ID]['value']
    if _text_of(objects, _PRT_SERIAL):
        entry['serial_number'] = _text_of(objects, _PRT_SERIAL)
    entry['printer'] = True
    if objects:
        entry['snmp_objects'] = objects
    if attributes:
        entry['ipp_attributes'] = attributes
    # What the stubs will serve, checked the way they will check it.
    snmp_objects(entry)
    ipp_attributes(entry)
    return {name: entry}


def to_yaml(personas: dict, sources: list[str]) -> str:
    import yaml
    header = ('# imported by safeq-lab persona import from ' + ', '.join(sources) + '\n'
              '# values are the captured device\'s (review before sharing: a walk holds its addresses)\n')
    return header + yaml.safe_dump(personas, sort_keys=False, allow_unicode=True, width=120,
                                   default_flow_style=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('name', help='persona name (a role id such as mfd-ricoh for roles/personas.yaml)')
    parser.add_argument('--snmp', metavar='FILE', help='snmpwalk -On output or an snmpsim .snmprec file')
    parser.add_argument('--ipp', metavar='FILE', help='ipptool -tv ... get-printer-attributes.test output')
    parser.add_argument('--vendor', help='vendor name (default: from printer-device-id or the model)')
    parser.add_argument('--output', '-o', metavar='FILE', help='write the YAML entry here (default: stdout)')


def run(args: argparse.Namespace) -> int:
    """Build, print or write the persona; PersonaDataError (a ValueError) for bad input."""
    personas = import_persona(args.snmp, args.ipp, args.name, vendor=args.vendor)
    text = to_yaml(personas, [str(p) for p in (args.snmp, args.ipp) if p])
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='safeq-lab persona import',
                                     description='Build a device persona from captures of a real device.')
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (PersonaDataError, OSError) as exc:
        print(f'safeq-lab: error: {exc}', file=sys.stderr)
        return 4


if __name__ == '__main__':
    sys.exit(main())
