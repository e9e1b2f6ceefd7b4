"""persona_import: captures of a real device (snmpwalk -On, .snmprec, ipptool -tv) -> a persona the
SNMP and IPP stubs serve; the persona schema and its one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pysnmp.proto.api import v2c
from twisted.internet.task import Clock

from emulator import persona_import as pi
from emulator.protocols import ipp, snmp
from emulator.protocols.base import Persona
from emulator.protocols.persona_schema import check_identity

DATA = Path(__file__).resolve().parents[1] / 'data' / 'personas'
WALK, SNMPREC, IPPTOOL = (DATA / f'ricoh-im-c3000.{ext}' for ext in ('walk', 'snmprec', 'ipptool.txt'))


def write(tmp_path: Path, text: str, name: str = 'capture.txt') -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- snmpwalk -On ------------------------------------------------------------------------------

def test_walk_types_multiline_strings_and_wrapped_hex():
    objects = pi.parse_walk(WALK)
    assert objects['1.3.6.1.2.1.1.2.0'] == {'type': 'oid', 'value': '1.3.6.1.4.1.367.1.1'}
    assert objects['1.3.6.1.2.1.1.3.0'] == {'type': 'timeticks', 'value': 123456789}
    assert objects['1.3.6.1.2.1.1.6.0']['value'] == 'Building 2, floor 3,\ncopy room'
    assert objects['1.3.6.1.2.1.2.2.1.6.1'] == {'type': 'hex', 'value': '002673a1b2c3'}
    assert objects['1.3.6.1.2.1.4.20.1.1.192.0.2.45'] == {'type': 'ipaddress', 'value': '192.0.2.45'}
    assert objects['1.3.6.1.2.1.25.3.5.1.1.1'] == {'type': 'integer', 'value': 3}   # "idle(3)"
    assert objects['1.3.6.1.2.1.43.11.1.1.9.1.2']['value'] == -3
    assert objects['1.3.6.1.4.1.367.3.2.1.2.19.5.1.9.1'] == {'type': 'gauge32', 'value': 64}
    assert objects['1.3.6.1.4.1.367.3.2.1.6.1.1.1.1']['value'] == '5249434f480001020304050607' \
        '08090a0b0c0d0e'   # a Hex-STRING wrapped over two lines
    assert objects['1.3.6.1.4.1.367.3.2.1.7.2.4.1.0'] == {'type': 'string', 'value': ''}
    assert objects['1.3.6.1.4.1.367.3.2.1.7.2.4.2.0'] == {'type': 'counter64', 'value': (1 << 64) - 1}
    assert list(objects) == sorted(objects, key=lambda oid: tuple(map(int, oid.split('.'))))


def test_snmprec_and_walk_agree_on_the_same_device():
    walk, rec = pi.parse_walk(WALK), pi.parse_snmprec(SNMPREC)
    for oid in ('1.3.6.1.2.1.1.2.0', '1.3.6.1.2.1.1.3.0', '1.3.6.1.2.1.2.2.1.6.1', '1.3.6.1.2.1.43.5.1.1.17.1',
                '1.3.6.1.2.1.43.10.2.1.4.1.1', '1.3.6.1.2.1.4.20.1.1.192.0.2.45'):
        assert rec[oid] == walk[oid], oid
    assert rec['1.3.6.1.2.1.1.5.0'] == {'type': 'string', 'value': 'RNP002673'}   # 4x, printable
    assert pi.parse_snmp_capture(SNMPREC) == rec and pi.parse_snmp_capture(WALK) == walk


@pytest.mark.parametrize('text, line, what', [
    ('.1.3.6.1.2.1.1.1.0 = STRING: "ok"\nSNMPv2-MIB::sysName.0 = STRING: x\n', 2, 'snmpwalk -On'),
    ('.1.3.6.1.2.1.1.2.0 = OID: SNMPv2-SMI::enterprises.367\n', 1, 'not numeric'),
    ('.1.3.6.1.2.1.1.1.0 = STRING: "never closed\n.1.3.6.1.2.1.1.2.0 = INTEGER: 1\n', 1, 'closing quote'),
    ('.1.3.6.1.2.1.1.7.0 = Float: 1.5\n', 1, "unsupported type 'Float'"),
    ('.1.3.6.1.2.1.1.7.0 = INTEGER: lots\n', 1, 'holds no number'),
    ('.1.3.6.1.2.1.1.7.0 = Gauge32: 4294967296\n', 1, 'unsigned 32-bit'),
    ('garbage\n', 1, 'not "OID = TYPE: value"'),
])
def test_bad_walk_lines_are_one_line_errors_with_the_line_number(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(pi.PersonaDataError) as caught:
        pi.parse_walk(path)
    message = str(caught.value)
    assert message.startswith(f'{path}:{line}: ') and what in message and '\n' not in message


@pytest.mark.parametrize('text, what', [
    ('1.3.6.1.2.1.1.1.0|4\n', 'oid|tag|value'),
    ('1.3.6.1.2.1.1.1.0|99|x\n', "unknown tag '99'"),
    ('1.3.6.1.2.1.1.1.0|4:numeric|x\n', 'variation module'),
    ('1.3.6.1.2.1.1.1.0|4x|zz\n', 'not hex'),
    ('1.3.6.1.2.1.1.7.0|2|seven\n', 'not a number'),
    ('sysDescr|4|x\n', 'not a numeric OID'),
])
def test_bad_snmprec_lines(tmp_path, text, what):
    path = write(tmp_path, text, 'device.snmprec')
    with pytest.raises(pi.PersonaDataError, match=f'^{re.escape(str(path))}:1: .*{re.escape(what)}'):
        pi.parse_snmprec(path)


# --- ipptool -tv -------------------------------------------------------------------------------

def test_ipptool_response_attributes_with_their_syntax():
    attributes, notes = pi.parse_ipptool(IPPTOOL)
    assert attributes['printer-make-and-model'] == {'syntax': 'textWithoutLanguage', 'values': ['RICOH IM C3000']}
    assert attributes['printer-device-id']['values'][0].count(',') == 5     # one value: commas kept
    assert attributes['finishings-supported'] == {'syntax': 'enum', 'values': [3, 4, 5, 20, 74]}
    assert attributes['copies-supported'] == {'syntax': 'rangeOfInteger', 'values': [[1, 999]]}
    assert attributes['printer-resolution-supported']['values'] == ['600x600dpi', '1200x1200dpi']
    assert attributes['color-supported'] == {'syntax': 'boolean', 'values': [True]}
    assert attributes['printer-organization']['values'] == ['']
    assert attributes['printer-geo-location'] == {'syntax': 'unknown', 'values': []}
    assert attributes['printer-firmware-string-version']['values'] == ['1.01', 'System 2.03, build 7']
    # The request's attributes, the response's operation group and the live ones stay out.
    for name in ('printer-uri', 'requested-attributes', 'attributes-charset', 'printer-uri-supported',
                 'printer-state', 'operations-supported', 'printer-current-time'):
        assert name not in attributes, name
    assert notes == ['media-col-database: collection not imported']


@pytest.mark.parametrize('body, what', [
    ('        status-code = client-error-not-found (client-error-not-found)\n', 'client-error-not-found'),
    ('        orientation-requested-default (enum) = sideways\n', "'sideways' is not a number or a known name"),
    ('        copies-supported (rangeOfInteger) = lots\n', 'is not lower-upper'),
    ('        color-supported (boolean) = yes\n', 'not true or false'),
    ('        printer-name (bogusType) = x\n', "unknown syntax 'bogusType'"),
    ('        this is not an attribute\n', 'not "name (type) = value"'),
])
def test_bad_ipptool_lines(tmp_path, body, what):
    path = write(tmp_path, '    Get printer attributes  [PASS]\n        RECEIVED: 99 bytes in response\n' + body)
    with pytest.raises(pi.PersonaDataError, match=f'^{re.escape(str(path))}:3: .*{re.escape(what)}'):
        pi.parse_ipptool(path)


def test_an_ipptool_capture_without_a_response_says_how_to_capture(tmp_path):
    with pytest.raises(pi.PersonaDataError, match='ipptool -tv'):
        pi.parse_ipptool(write(tmp_path, 'printer-name (nameWithoutLanguage) = x\n'))


# --- the persona ------------------------------------------------------------------------------

def test_import_persona_builds_an_entry_the_stubs_serve():
    [(name, entry)] = pi.import_persona(WALK, IPPTOOL, 'mfd-ricoh').items()
    assert name == 'mfd-ricoh' and entry['vendor'] == 'RICOH' and entry['make_model'] == 'RICOH IM C3000'
    assert entry['sys_object_id'] == '1.3.6.1.4.1.367.1.1' and entry['serial_number'] == '3101R600789'
    persona = Persona(host='mfd-1', roles=('mfd', 'mfd-ricoh'), identity=entry)
    objects = snmp.persona_objects(persona, lambda: 42)
    assert objects[(1, 3, 6, 1, 4, 1, 367, 3, 2, 1, 7, 2, 4, 2, 0)] == v2c.Counter64((1 << 64) - 1)
    assert objects[snmp.PRT_MARKER_LIFE_COUNT] == v2c.Counter32(187356)
    assert objects[(1, 3, 6, 1, 2, 1, 2, 2, 1, 6, 1)].asOctets() == bytes.fromhex('002673a1b2c3')
    assert objects[snmp.SYS_UPTIME]() == v2c.TimeTicks(42)    # live, not the captured 123456789
    printer = ipp.Printer(Clock(), persona)
    served = {a.name: a for _, a in printer.printer_attributes(ipp.Context('h:631', '/ipp/print', False, 'p', 631))}
    assert served['finishings-supported'].values == [3, 4, 5, 20, 74]
    assert served['printer-resolution-default'].values == [ipp.Resolution(600, 600, 3)]
    assert served['printer-firmware-string-version'].values == ['1.01', 'System 2.03, build 7']
    assert served['printer-uri-supported'].values == ['ipp://h:631/ipp/print']   # the stub's own
    assert 'image/urf' in printer.formats


def test_the_yaml_output_passes_the_persona_schema_and_keeps_its_types(tmp_path, capsys):
    out = tmp_path / 'persona.yaml'
    assert pi.main(['mfd-ricoh', '--snmp', str(SNMPREC), '--ipp', str(IPPTOOL), '-o', str(out)]) == 0
    entry = yaml.safe_load(out.read_text())['mfd-ricoh']
    typed = check_identity(entry, 'mfd-ricoh')
    assert typed['printer'] is True and isinstance(typed['snmp_objects'], dict)
    assert pi.snmp_objects(typed) == pi.snmp_objects(entry)
    assert pi.ipp_attributes(typed) == pi.ipp_attributes(entry)


def test_a_stringified_mapping_is_a_type_error_not_parsed():
    with pytest.raises(pi.PersonaDataError, match=r"snmp_objects.*must be mapping"):
        pi.snmp_objects({'snmp_objects': "{'1.3.6.1.2.1.1.1.0': {'type': 'string', 'value': 'x'}}"})


def test_main_reports_bad_input_on_one_line(tmp_path, capsys):
    bad = write(tmp_path, '.1.3.6.1.2.1.1.1.0 = STRING: "x"\nnonsense here\n')
    assert pi.main(['mfd-x', '--snmp', str(bad)]) == 4
    err = capsys.readouterr().err.strip()
    assert err == f'safeq-lab: error: {bad}:2: not "OID = TYPE: value" (capture with snmpwalk -On)'
    assert pi.main(['mfd-x']) == 4 and 'give an SNMP capture' in capsys.readouterr().err


@pytest.mark.parametrize('identity, what', [
    ({'snmp_objects': {'1.3.x': {'type': 'integer', 'value': 1}}}, 'not a numeric OID'),
    ({'snmp_objects': {'1.3.6.1': {'type': 'float', 'value': 1}}}, "type 'float'"),
    ({'snmp_objects': {'1.3.6.1': {'type': 'integer', 'value': 1 << 40}}}, '32-bit'),
    ({'snmp_objects': {'1.3.6.1': {'type': 'hex', 'value': 'xyz'}}}, 'hex octets'),
    ({'snmp_objects': {'1.3.6.1': {'type': 'string'}}}, 'exactly type and value'),
    ({'snmp_objects': 'not a mapping'}, "field 'snmp_objects' must be mapping"),
    ({'ipp_attributes': {'Printer-Name': {'syntax': 'keyword', 'values': ['x']}}}, 'lower-case'),
    ({'ipp_attributes': {'copies-supported': {'syntax': 'rangeOfInteger', 'values': [[9, 1]]}}}, 'lower, upper'),
    ({'ipp_attributes': {'printer-name': {'syntax': 'keyword', 'values': []}}}, 'non-empty list'),
    ({'toner': 'black=12'}, 'colour:level'),
    ({'input_trays': 'Tray 1'}, 'name=capacity'),
    ({'color': 'maybe'}, "field 'color' must be bool"),
])
def test_persona_schema_errors_name_the_field(identity, what):
    with pytest.raises(pi.PersonaDataError, match=what):
        pi.snmp_objects(identity)
        pi.ipp_attributes(identity)
        pi.supplies(identity)
        pi.input_trays(identity)
        pi.flag(identity, 'color', True)


def test_live_ipp_attributes_are_never_served_from_a_persona():
    identity = {'ipp_attributes': {'printer-state': {'syntax': 'enum', 'values': [5]},
                                   'printer-name': {'syntax': 'nameWithoutLanguage', 'values': ['n']}}}
    assert set(pi.ipp_attributes(identity)) == {'printer-name'}
