"""SOAP 1.1/1.2 codec shared by the server and the probe: envelopes, Faults (1.1 names mapped
to 1.2 codes), parsing a message into its first Body element and that element's children into
a dict. XML with a DTD is refused (no entity tricks); a malformed message is a ``SoapFault``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape as xml_escape

SOAP11_ENV = 'http://schemas.xmlsoap.org/soap/envelope/'
SOAP12_ENV = 'http://www.w3.org/2003/05/soap-envelope'
SOAP_ENV = {'1.1': SOAP11_ENV, '1.2': SOAP12_ENV}
SOAP_CONTENT_TYPE = {'1.1': 'text/xml; charset=utf-8', '1.2': 'application/soap+xml; charset=utf-8'}


class SoapFault(Exception):
    """code: 'Client' | 'Server' | 'VersionMismatch' (SOAP 1.1 names; 1.2 maps them)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_FAULT_12 = {'Client': 'Sender', 'Server': 'Receiver', 'VersionMismatch': 'VersionMismatch'}


def local_name(tag: str) -> tuple[str, str]:
    """(namespace, local name) of an ElementTree tag such as ``{ns}name``."""
    if tag.startswith('{'):
        ns, _, local = tag[1:].partition('}')
        return ns, local
    return '', tag


def scalar_text(value: Any) -> str:
    """A scalar as SOAP text (XML Schema booleans are 'true'/'false')."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def _xml_fields(fields: dict[str, Any], prefix: str) -> str:
    out = []
    for name, value in fields.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                inner = _xml_fields(item, prefix)
            else:
                inner = xml_escape(scalar_text(item))
            out.append(f'<{prefix}:{name}>{inner}</{prefix}:{name}>')
    return ''.join(out)


def soap_envelope(version: str, namespace: str, element: str, fields: dict[str, Any]) -> bytes:
    """A SOAP envelope whose Body holds ``<element xmlns=namespace>`` with ``fields`` as children."""
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<soap:Envelope xmlns:soap="{SOAP_ENV[version]}"><soap:Body>'
            f'<t:{element} xmlns:t="{xml_escape(namespace)}">{_xml_fields(fields, "t")}</t:{element}>'
            '</soap:Body></soap:Envelope>').encode('utf-8')


def soap_fault(version: str, code: str, reason: str) -> bytes:
    env = SOAP_ENV[version]
    if version == '1.1':
        body = (f'<soap:Fault><faultcode>soap:{code}</faultcode>'
                f'<faultstring>{xml_escape(reason)}</faultstring></soap:Fault>')
    else:
        body = (f'<soap:Fault><soap:Code><soap:Value>soap:{_FAULT_12.get(code, code)}</soap:Value></soap:Code>'
                f'<soap:Reason><soap:Text xml:lang="en">{xml_escape(reason)}</soap:Text></soap:Reason>'
                '</soap:Fault>')
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<soap:Envelope xmlns:soap="{env}"><soap:Body>{body}</soap:Body></soap:Envelope>').encode('utf-8')


def parse_xml(data: bytes, what: str) -> ET.Element:
    # SOAP 1.1/1.2 and our WebDAV forbid DTDs; refusing them also rules out entity tricks.
    if b'<!DOCTYPE' in data or b'<!ENTITY' in data:
        raise SoapFault('Client', f'{what} must not contain a DTD')
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as exc:
        raise SoapFault('Client', f'{what} is not well-formed XML: {exc}') from None


def parse_soap(data: bytes, version: str | None = None) -> tuple[str, ET.Element]:
    """(version, first Body element) of a SOAP envelope; SoapFault if it is not one."""
    root = parse_xml(data, 'SOAP message')
    ns, local = local_name(root.tag)
    if local != 'Envelope':
        raise SoapFault('Client', f'root element is {local!r}, not a SOAP Envelope')
    found = {env: v for v, env in SOAP_ENV.items()}.get(ns)
    if found is None or (version is not None and found != version):
        raise SoapFault('VersionMismatch', f'Envelope namespace {ns!r} does not match SOAP {version or "1.1/1.2"}')
    body = root.find(f'{{{ns}}}Body')
    if body is None:
        raise SoapFault('Client', 'Envelope has no Body')
    children = list(body)
    if not children:
        raise SoapFault('Client', 'Body is empty')
    return found, children[0]


def soap_params(element: ET.Element) -> dict[str, Any]:
    """Child elements as a dict: text for leaves, nested dicts, repeated names as lists."""
    out: dict[str, Any] = {}
    for child in element:
        name = local_name(child.tag)[1]
        value: Any = soap_params(child) if len(child) else (child.text or '').strip()
        if name in out:
            out[name] = out[name] if isinstance(out[name], list) else [out[name]]
            out[name].append(value)
        else:
            out[name] = value
    return out


def fault_text(element: ET.Element) -> str:
    """'<code>: <reason>' of a Fault element (1.1 or 1.2)."""
    params = soap_params(element)
    if 'faultcode' in params:
        return f'{params.get("faultcode")}: {params.get("faultstring", "")}'
    code = params.get('Code', {})
    reason = params.get('Reason', {})
    return f'{code.get("Value", "?") if isinstance(code, dict) else code}: ' \
           f'{reason.get("Text", "") if isinstance(reason, dict) else reason}'

