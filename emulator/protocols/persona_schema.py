"""The persona fields stubs read (``Persona.identity``), each with its type: the one place they are listed.

``roles/personas.yaml`` entries, persona files a user gives and the identity a role daemon receives
are checked against ``FIELDS`` where they enter (``check_identity``): an unknown field (usually a
typo) or a value of the wrong type is a one-line ``PersonaError`` naming the owner and the field,
instead of a stub serving a silently wrong answer. Protocol modules may then rely on the types.

Formats a type alone does not say (``toner``, ``input_trays``, ``snmp_objects``,
``ipp_attributes``) are checked in depth by ``emulator.persona_import``, which builds the device
data from them.
"""
from __future__ import annotations

import re
from typing import Any, Callable


class PersonaError(ValueError):
    """A persona field is unknown or has the wrong type; the message is one line."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `true` where a count belongs is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _whole(value: Any) -> bool:
    return _is_int(value)


def _oid(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r'\.?\d+(\.\d+)+', value) is not None


def _port(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= 65535


def _texts(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _port_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_port, value))


def _mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _text_mapping(value: Any) -> bool:
    return _mapping(value) and all(isinstance(item, str) for item in value.values())


def _name_or_number(value: Any) -> bool:
    return isinstance(value, str) or _is_int(value)


# type name (as errors show it) -> check
TYPES: dict[str, Callable[[Any], bool]] = {
    'str': _text, 'bool': _flag, 'int': _whole, 'oid': _oid, 'port': _port, 'list[str]': _texts,
    '[low, high] ports': _port_pair, 'mapping': _mapping, 'mapping str->str': _text_mapping,
    'str or int': _name_or_number,
}

FIELDS: dict[str, str] = {
    # who the device or server is
    'vendor': 'str', 'make_model': 'str', 'product': 'str', 'version': 'str', 'serial_number': 'str',
    'printer': 'bool',                   # serves the Printer-MIB (SNMP) as a print device
    # SNMP system group and HOST-RESOURCES
    'sys_descr': 'str', 'sys_object_id': 'oid', 'sys_contact': 'str', 'sys_name': 'str',
    'sys_location': 'str', 'sys_services': 'int', 'snmp_community': 'str',
    'device_status': 'str or int', 'printer_status': 'str or int',
    # print device data (formats of toner / input_trays: emulator/persona_import.py)
    'page_count': 'int', 'color': 'bool', 'pages_per_minute': 'int',
    'toner': 'str', 'toner_capacity': 'int', 'supply_type': 'str', 'supply_unit': 'str',
    'input_trays': 'str', 'document_formats': 'list[str]', 'ipp_versions': 'list[str]',
    'printer_name': 'str', 'printer_info': 'str', 'location': 'str',
    'snmp_objects': 'mapping', 'ipp_attributes': 'mapping',
    # HTTP: the Server header and which parts of the lab surface this host serves
    'http_server': 'str', 'http_endpoints': 'list[str]', 'http_soap': 'bool', 'http_webdav': 'bool',
    # TLS
    'tls_max_version': 'str',
    # accounts and banners of the other stubs
    'ftp_user': 'str', 'ftp_password': 'str', 'ftp_banner': 'str', 'ftp_data_port': 'port',
    'passive_ports': '[low, high] ports',
    'mail_user': 'str', 'mail_password': 'str', 'mail_domain': 'str',
    'ssh_user': 'str', 'ssh_password': 'str', 'ssh_banner': 'str',
    'db_accounts': 'mapping str->str', 'mssql_version': 'str', 'pgsql_version': 'str', 'pgsql_auth': 'str',
    'ldap_directory': 'str', 'lpd_queues': 'list[str]', 'smb_shares': 'list[str]',
    'netbios_name': 'str', 'workgroup': 'str', 'mac': 'str',
    'dnssd_name': 'str', 'pdl': 'str', 'urf': 'str', 'ipp_port': 'port', 'ipps_port': 'port', 'lpd_port': 'port',
    'jgroups_cluster': 'str', 'caches': 'str',
}


def check_field(name: str, value: Any, where: str = 'persona') -> None:
    kind = FIELDS.get(name)
    if kind is None:
        raise PersonaError(f'{where}: unknown field {name!r}')
    if not TYPES[kind](value):
        raise PersonaError(f'{where}: field {name!r} must be {kind}, got {value!r:.60}')


def check_identity(identity: Any, where: str = 'persona') -> dict:
    """``identity`` checked against FIELDS; returns it as a new dict (lists stay lists)."""
    if not isinstance(identity, dict):
        raise PersonaError(f'{where}: must be a mapping of fields, got {type(identity).__name__}')
    for name, value in identity.items():
        check_field(name, value, where)
    return {name: list(value) if isinstance(value, tuple) else value for name, value in identity.items()}
