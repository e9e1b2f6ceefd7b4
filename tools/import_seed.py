"""One-off generator: vendor table -> emulator/catalog/flows.yaml + roles.yaml.

This script is kept ONLY as the record of how the catalog seed was first produced from
the vendor's network-communication table (not redistributed: pass its path).  The YAML files are the source of truth: they were
reviewed and hand-fixed after generation, and the emulator never parses the vendor text.
Do not re-run it over the reviewed files (it would drop the hand edits and comments);
if you do run it, write elsewhere and diff:

    python tools/import_seed.py --out /tmp/seed
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / 'shared' / 'seed' / 'network-communication.txt'  # the vendor's table, outside the repo
COLUMNS = ('client_text', 'server_text', 'unsecured', 'secured', 'application', 'network', 'data')

# --- roles: (id, name, kind, vendor wordings exactly as in the table) -------------------------
_ET = 'Embedded terminal for '
ROLES = [
    ('user', 'User', 'client', ['User', 'User/LPD']),
    ('termtool', 'User (termtool user utility)', 'client', ['User (termtool user utility)']),
    ('management', 'Management', 'safeq', ['Management']),
    ('spooler-controller', 'Spooler Controller', 'safeq', ['Spooler Controller', 'Spooler Controller group']),
    ('payment-machine', 'Payment machine (SPM)', 'terminal', ['Payment machine (SPM)']),
    ('proactivecare', 'ProactiveCare', 'safeq', ['ProactiveCare']),
    ('mobile-integration-gateway', 'Mobile Integration Gateway', 'safeq', ['Mobile Integration Gateway']),
    ('end-user-interface', 'End User Interface', 'safeq', ['End User Interface']),
    ('mobile-print-server', 'Mobile Print Server', 'safeq', ['Mobile Print Server']),
    ('flexispooler', 'FlexiSpooler', 'safeq', [
        'FlexiSpooler', 'Flexispooler', 'FlexiSpooler server/client spooling',
        'FlexiSpooler client spooling/non spooling', 'FlexiSpooler server spooling/non spooling',
        'FlexiSpooler server/client non spooling']),
    ('spooler', 'Spooler', 'safeq', ['Spooler', 'Spooler (Server Spooling)']),
    ('terminal-server', 'Terminal Server', 'safeq',
     ['Terminal Server', 'Terminal Server (ETCD)', 'Terminal Server (SQTA)']),
    ('workflow-processing-system', 'Workflow Processing System', 'safeq', ['Workflow Processing System']),
    ('payment-system', 'Payment System', 'safeq', ['Payment System', 'Payment System Web Interface']),
    ('job-service', 'Job Service', 'safeq', ['Job Service']),
    ('identity-server', 'Identity Server', 'safeq', ['Identity Server']),
    ('js-infinispan', 'JS Infinispan', 'safeq', ['JS Infinispan']),
    ('infinispan', 'Infinispan', 'safeq', ['Infinispan']),
    ('mysafeq', 'MySafeQ', 'safeq', ['MySafeQ']),
    ('desktop-interface', 'Desktop Interface', 'client', ['Desktop Interface']),
    ('safeq-client', 'SafeQ Client', 'client', ['SafeQ Client']),
    ('other-app-lpr', 'Other app (e.g. SAP) LPR printing', 'client', ['Other app (e.g. SAP) LPR printing']),
    ('system-spooler-windows', 'System spooler (Windows)', 'client', ['System spooler (Windows)']),
    ('system-spooler-mac', 'System spooler (MAC)', 'client', ['System spooler (MAC)']),
    *[(f'embedded-terminal-{fam}', _ET + text, 'terminal', [_ET + text]) for fam, text in [
        ('xerox', 'Xerox'), ('xerox-versalink', 'Xerox Versalink'), ('xerox-altalink', 'Xerox Altalink'),
        ('fuji-xerox', 'Fuji Xerox'), ('fuji-xerox-xcp', 'Fuji Xerox XCP'), ('fujifilm-bi', 'FUJIFILM BI'),
        ('konica-minolta', 'Konica Minolta, Develop, Olivetti'), ('sharp', 'Sharp'), ('sharp-esf', 'Sharp-eSF'),
        ('toshiba', 'Toshiba (non MDS)'), ('toshiba-mds', 'Toshiba MDS'), ('samsung', 'Samsung'),
        ('lexmark', 'Lexmark'), ('ricoh', 'Ricoh'), ('epson', 'Epson'), ('brother', 'Brother'), ('hp', 'HP'),
        ('oki', 'OKI'), ('oki-sxp2', 'OKI sXP2')]],
    ('terminal-pro', 'Terminal Professional', 'terminal', ['Terminal Professional', 'Terminal Professional (TP4)']),
    ('terminal-pro-35', 'Terminal Professional (TPv3.5)', 'terminal',
     ['Terminal Professional (TPv3.5)', 'Terminal Professional (TPv3.5) in Network card reader mode']),
    ('terminal-ultralight', 'Terminal Ultralight', 'terminal', ['Terminal Ultralight']),
    ('network-card-reader', 'Network card reader', 'terminal', ['Network card reader']),
    ('mobile-terminal', 'Mobile terminal', 'terminal', [
        'Mobile terminal', 'Mobile terminal (Android)', 'Mobile terminal (iPhone)', 'Mobile terminal (Windows Phone)']),
    ('mobile-device', 'Mobile device', 'client', ['Mobile device']),
    ('edee', 'EDEE', 'terminal', ['EDEE']),
    ('ua', 'UA', 'terminal', ['UA']),
    ('usb-card-reader', 'USB card reader', 'terminal', ['USB card reader']),
    ('mfd', 'MFD', 'device', ['MFD', 'MFD/PC']),
    *[(f'mfd-{vendor}', f'MFD ({text})', 'device', [f'MFD ({text})']) for vendor, text in [
        ('konica-minolta', 'Konica Minolta'), ('ricoh', 'Ricoh'), ('fujifilm-bi', 'FUJIFILM BI'), ('hp', 'HP'),
        ('toshiba', 'Toshiba'), ('sharp', 'Sharp'), ('sharp-esf', 'Sharp-eSF'), ('samsung', 'Samsung'),
        ('lexmark', 'Lexmark'), ('epson', 'Epson'), ('xerox', 'Xerox'), ('fuji-xerox', 'Fuji Xerox'),
        ('fuji-xerox-xcp', 'Fuji Xerox XCP')]],
    ('database-mssql', 'Database server (MS SQL)', 'external', ['Database server (MS SQL)']),
    ('database-pgsql', 'Database server (PGSQL)', 'external', ['Database server (PGSQL)']),
    ('ldap-replicator', 'LDAP Replicator service', 'safeq', ['LDAP Replicator service']),
    ('ldap-server', 'LDAP Server', 'external', ['LDAP Server']),
    ('microsoft-exchange', 'Microsoft Exchange', 'external', ['Microsoft Exchange']),
    ('onedrive', 'Microsoft OneDrive for Business (365)', 'external', ['Microsoft OneDrive for Business (365)']),
    ('sharepoint-2010', 'Microsoft SharePoint 2010', 'external', ['Microsoft SharePoint 2010']),
    ('sharepoint-2013', 'Microsoft SharePoint 2013', 'external', ['Microsoft SharePoint 2013']),
    ('sharepoint-2016', 'Microsoft SharePoint 2016', 'external', ['Microsoft SharePoint 2016']),
    ('sharepoint-online', 'Microsoft SharePoint Online (365)', 'external', ['Microsoft SharePoint Online (365)']),
    ('ims', 'IMS', 'safeq', ['IMS']),
    ('ims-proxy', 'IMS Proxy', 'safeq', ['IMS Proxy']),
    ('identity-provider', 'Identity Provider (SAML)', 'external', ['Identity Provider (SAML)']),
    ('mail-server', 'Mail Server', 'external', ['Mail Server']),
    ('external-system', 'External System', 'external', ['External System']),
    ('shared-folder', 'Shared folder', 'external', ['Shared folder', 'Shared folder (used by EUI)']),
    ('dropbox', 'DropBox (Business/Enterprise)', 'external', ['DropBox (Business/Enterprise)']),
    ('file-system', 'File System', 'external', ['File System']),
    ('hp-records-manager', 'HP Records Manager (HP Trim)', 'external', ['HP Records Manager (HP Trim)']),
    ('payment-gateway', 'Payment Gateway', 'external', ['Payment Gateway']),
    ('external-payment-system', 'External Payment System', 'external', ['External Payment System']),
    ('edge-config-application', 'Edge configuration application', 'safeq', ['edge-config-application']),
    ('edge-remote-site-server-config', 'Edge remote Site Server configuration', 'safeq',
     ['edge-remote-site-server-config']),
]
ALIAS = {alias: rid for rid, _, _, aliases in ROLES for alias in aliases}
ALIAS['–'] = None

# --- protocols ---------------------------------------------------------------------------
APP_PROTOCOL = {
    'HTTP/HTTPS': 'http', 'HTTP': 'http', 'HTTPS': 'http', 'HTTP REST API (JSON)/HTTPS': 'http',
    'HTTP REST API/HTTPS': 'http', 'HTTP (REST)/HTTPS': 'http', 'TCP/IP/HTTPS': 'http',
    'SOAP/HTTPS': 'soap', 'WebDAV/WebDAVS': 'webdav',
    'LDAP/LDAPS': 'ldap', 'LDAP/LDAP over STARTTLS': 'ldap', 'LDAP/LDAPS/LDAP over STARTTLS': 'ldap',
    'JMX, JMX RMI': 'jmx', 'JMX': 'jmx', 'JMX RMI': 'jmx',
    'FTP': 'ftp', 'FTP - passive': 'ftp', 'FTP - active': 'ftp',
    'SNMPv2c': 'snmp', 'SNMP': 'snmp', 'SNMPv2c over TCP/IP or UDP/IP': 'snmp',
    'SNMPv2c trap over UDP/IP': 'snmp-trap',
    'LPR': 'lpr', 'TCP/IP raw/jet direct': 'raw', 'TCP/IP (RAW)': 'raw', 'IPP/IPPSSL': 'ipp',
    'JGroups': 'jgroups', 'SMTP/SMTPS': 'smtp', 'SMTP': 'smtp', 'mDNS (UDP)': 'mdns',
    'POP3/POP3S': 'pop3', 'IMAP/IMAPS': 'imap', 'SMB': 'smb', 'SSH': 'ssh', 'AJP': 'ajp',
}
# Proprietary / YMQ / 'TCP/IP' / empty application cells: the port says which SafeQ protocol it is.
PORT_PROTOCOL = {37: 'time', 64099: 'discovery',
                 **{p: 'terminal' for p in (4095, 4096, 4196, 4197, 4198, 4199)},
                 **{p: 'safeq' for p in (5555, 5556, 5557, 5558, 6010, 6020, 4099, 64098, 58070)}}
TLS_ONLY_APPS = {'HTTPS'}
# Transport when the network cell is empty.
INFERRED_TRANSPORT = {'snmp': 'udp', 'snmp-trap': 'udp', 'ftp': 'tcp', 'ajp': 'tcp', 'terminal': 'tcp',
                      'safeq': 'tcp', 'smtp': 'tcp', 'smb': 'tcp'}
# Well-known ports used when the vendor gives no number in either cell: (plain, tls, note).
DEFAULTS = {
    'ldap': ([389], [636], 'LDAP 389 and LDAPS 636'),
    'snmp': ([161], [], 'SNMP agent 161/udp (SNMPv2c has no TLS form, so the secured cell adds nothing)'),
    'snmp-trap': ([162], [], 'SNMP trap 162/udp (SNMPv2c has no TLS form, so the secured cell adds nothing)'),
    'webdav': ([80], [443], 'WebDAV 80 and WebDAVS 443'),
    'http': ([80], [443], 'HTTP 80 and HTTPS 443'),
    'smb': ([445], [], 'SMB 445/tcp'),
    'smtp': ([25], [465], 'SMTP 25 and SMTPS 465'),
}


def slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def read_rows(path: Path = SEED) -> list[dict]:
    """Vendor rows as dicts; a line starting with ' |' continues the previous row."""
    raw: list[list] = []
    section, prev = None, ''
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.startswith('| Client side'):
            section = prev.strip()
        elif line.startswith(' |'):
            raw[-1][1] += line
        elif line.startswith('|') and section:
            raw.append([section, line])
        prev = line
    rows, counters = [], {}
    for section, text in raw:
        cells = [c.strip() for c in text.strip()[1:-1].split('|')]
        assert len(cells) == 7, (section, text)
        counters[section] = counters.get(section, 0) + 1
        rows.append({'section': section, 'row': counters[section], **dict(zip(COLUMNS, cells))})
    return rows


def parse_ports(text: str) -> dict | None:
    """Port cell -> {shape, text, ports, ranges}; None when the cell is not a port cell at all."""
    t, low = text.strip(), text.strip().lower()
    spec = {'shape': None, 'text': t, 'ports': [], 'ranges': []}
    named = {'': 'unspecified', 'n/a': 'not_applicable', 'user defined': 'user_defined',
             'device-dependent': 'device_dependent'}
    if low in named:
        spec['shape'] = named[low]
    elif re.fullmatch(r'\d+', t):
        spec.update(shape='single', ports=[int(t)])
    elif re.fullmatch(r'\d+-\d+', t):
        spec.update(shape='range', ranges=[[int(x) for x in t.split('-')]])
    elif re.fullmatch(r'[\d, -]+', t):
        items = [i.strip() for i in t.split(',')]
        spec['ports'] = [int(i) for i in items if '-' not in i]
        spec['ranges'] = [[int(x) for x in i.split('-')] for i in items if '-' in i]
        spec['shape'] = 'mixed' if spec['ranges'] else 'list'
    elif '/' in t and re.match(r'\d', t):
        spec.update(shape='alternatives', ports=[int(x) for x in re.findall(r'\d+', t)])
    else:
        return None
    return spec


def ep(text: str) -> dict:
    """'515/tcp lpr plain', '1024-65535/tcp ftp-data plain data', 'icmp icmp plain' -> endpoint dict."""
    where, protocol, security, *channel = text.split()
    if where == 'icmp':
        return {'transport': 'icmp', 'protocol': protocol, 'security': security}
    port, transport = where.split('/')
    d = {'transport': transport}
    if '-' in port:
        d['port_range'] = [int(x) for x in port.split('-')]
    else:
        d['port'] = int(port)
    d.update(protocol=protocol, security=security)
    if channel:
        d['channel'] = channel[0]
    return d


def override_ports(spec_u, spec_s, plain, tls):
    spec_u.update(ports=plain, is_default=bool(plain))
    spec_s.update(ports=tls, is_default=bool(tls))


def generic_endpoints(r: dict, u: dict, s: dict, notes: list[str]) -> list[dict]:
    app, net = r['application'], r['network']
    if net == 'ICMP':
        return [ep('icmp icmp plain')]
    protocol = APP_PROTOCOL.get(app)
    if app == 'TCP/TCP over TLS':
        protocol = {'Database server (MS SQL)': 'mssql', 'Database server (PGSQL)': 'pgsql'}[r['server_text']]
    numeric = bool(u['ports'] or u['ranges'] or s['ports'] or s['ranges'])
    if not numeric and protocol in DEFAULTS and not (app in TLS_ONLY_APPS):
        plain, tls, what = DEFAULTS[protocol]
        if app == 'SMTP':  # plain SMTP only: no SMTPS default
            tls, what = [], 'SMTP 25'
        override_ports(u, s, plain, tls)
        notes.append(f"No port given ({u['text'] or 'empty'}); defaults are the well-known {what}.")
    elif not numeric and app in TLS_ONLY_APPS:
        override_ports(u, s, [], [443])
        notes.append(f"No port given ({s['text'] or 'empty'}); default is the well-known HTTPS 443.")
    # transports
    if 'UDP' in u['text'] or 'UDP' in s['text']:
        transports = ['udp']
        if net != 'UDP':
            notes.append('Port cell says UDP, so the endpoints are UDP only.')
    elif app == 'SNMPv2c over TCP/IP or UDP/IP':
        transports = ['udp', 'tcp']
        notes.append('Application says SNMP over TCP or UDP, so both transports are emitted.')
    elif net:
        transports = {'TCP': ['tcp'], 'UDP': ['udp'], 'TCP/UDP': ['tcp', 'udp']}[net]
    else:
        guess = protocol or PORT_PROTOCOL.get((u['ports'] or [None])[0])
        transports = [INFERRED_TRANSPORT[guess]]
        notes.append(f'Network cell is empty; transport {transports[0]} inferred from the protocol ({guess}).')
    # endpoints: unsecured ports first, then secured-only ports
    out = []
    order = list(dict.fromkeys(u['ports'] + s['ports']))
    for port in order:
        both = port in u['ports'] and port in s['ports']
        if both:
            security = 'starttls' if 'STARTTLS' in app else 'tls' if app in TLS_ONLY_APPS else 'optional'
        else:
            security = 'plain' if port in u['ports'] else 'tls'
        proto = protocol or PORT_PROTOCOL[port]
        for t in transports:
            out.append({'transport': t, 'port': port, 'protocol': proto, 'security': security})
    for lo, hi in u['ranges'] + s['ranges']:
        for t in transports:
            out.append({'transport': t, 'port_range': [lo, hi], 'protocol': 'ftp-data',
                        'security': 'plain', 'channel': 'data'})
    return out


def build_flow(r: dict) -> dict:
    fid = f"{slug(r['section'])}-{r['row']:02d}"
    u, s = parse_ports(r['unsecured']), parse_ports(r['secured'])
    notes: list[str] = []
    fix = FIXES.get(fid, {})
    if s is None:  # edge row: the application cell slid into the secured port column
        s = {'shape': 'unspecified', 'text': r['secured'], 'ports': [], 'ranges': []}
    if 'endpoints' in fix:
        endpoints = [ep(e) for e in fix['endpoints']]
        if 'ports' in fix:
            override_ports(u, s, *fix['ports'])
    else:
        endpoints = generic_endpoints(r, u, s, notes)
    if 'note' in fix:
        notes.append(fix['note'])

    def spec(d: dict) -> dict:  # keep the YAML short: ranges / is_default only when set
        return {k: v for k, v in d.items() if v or k in ('shape', 'text', 'ports')}

    return {
        'id': fid, 'section': r['section'], 'row': r['row'],
        'client': ALIAS[r['client_text']], 'client_text': r['client_text'],
        'server': ALIAS[r['server_text']], 'server_text': r['server_text'],
        'network': r['network'], 'application': r['application'], 'data': r['data'],
        'unsecured': spec(u), 'secured': spec(s), 'endpoints': endpoints,
        'note': ' '.join(notes), 'why_not': fix.get('why_not', ''),
    }


# Rows the generic rules cannot express, keyed by id (checked against the table by build()).
ACTIVE_FTP_SESSION = 'terminal-server-42'  # MFD -> Terminal Server, 21, 1024-65535 FTP (scan upload)
FIXES = {
    'terminal-server-31': {  # OKI sXP2 LDAP/LDAPS/LDAP over STARTTLS, 389 | 636
        'endpoints': ['389/tcp ldap starttls', '636/tcp ldap tls'],
        'note': 'STARTTLS runs on the unsecured port 389 (application says LDAP over STARTTLS), '
                'so 389 is starttls and 636 is LDAPS.'},
    'payment-06': {'why_not': 'The protocol and port depend on the external payment system '
                              '(vendor: "Protocol depends on external payment system").', 'endpoints': []},
    'payment-08': {'endpoints': ['4095/tcp terminal plain'], 'ports': ([4095], []),
                   'note': 'Port cells are empty; default 4095/tcp, the termtool port of the '
                           'termtool -> Terminal Ultralight row (terminal-ultralight-02).'},
    'mfd-22': {'why_not': 'USB card reader is attached by USB, not a network flow.', 'endpoints': []},
    'mfd-23': {'endpoints': ['515/tcp lpr plain', '9100/tcp raw plain', '80/tcp ipp plain',
                             '443/tcp ipp tls', '631/tcp ipp tls'],
               'note': 'Protocols mapped by position: 515 LPR, 9100 RAW, 80 IPP; 443 and 631 IPPS.'},
    'mfd-24': {'endpoints': ['1024-65535/tcp ftp-data plain data'],
               'note': f'Active-mode FTP data channel of the scan-upload FTP session in {ACTIVE_FTP_SESSION} '
                       '(MFD -> Terminal Server 21); exercised by that session. Network cell is empty; tcp.',
               'why_not': f'Active-mode FTP data channel of the {ACTIVE_FTP_SESSION} FTP session '
                          '(Terminal Server connects back to the MFD), not a listener of its own.'},
    'mfd-25': {'endpoints': ['9100/tcp raw plain', '631/tcp ipp plain', '443/tcp ipp tls'],
               'ports': ([9100, 631], [443]),
               'note': 'User defined ports; defaults JetDirect 9100, IPP 631, IPPS 443.'},
    'workflow-processing-system-02': {
        'endpoints': ['445/tcp smb plain', '80/tcp webdav plain', '443/tcp webdav tls'],
        'ports': ([445, 80], [443]),
        'note': 'No port given (n/a); defaults SMB 445/tcp, WebDAV 80, WebDAVS 443.'},
    'terminal-pro-3-5-02': {'endpoints': ['4095/tcp terminal plain'], 'ports': ([4095], []),
                            'note': 'Port cells are empty; default 4095/tcp, the termtool port of the '
                                    'termtool -> Terminal Ultralight row (terminal-ultralight-02).'},
    'others-21': {'endpoints': ['162/udp snmp-trap plain'], 'ports': ([162], []),
                  'note': 'The SPM sends SNMPv2c state-change notifications to the user, i.e. traps; '
                          'User defined ports, default SNMP trap 162/udp.'},
    'others-27': {'why_not': 'No client ("–"): nothing in the table connects to AJP 9009. The lab listens '
                             'there only to check that nobody reaches it.'},
    'others-35': {'why_not': 'No port, application or network protocol given (n/a, empty cells).',
                  'endpoints': []},
    'others-34': {'endpoints': ['5515/tcp lpr plain', '5631/tcp ipp plain', '5632/tcp ipp tls'],
                  'note': 'Protocols mapped by position: 5515 LPR, 5631 IPP; 5632 IPPS.'},
    'others-33': {'endpoints': ['515/tcp lpr plain', '631/tcp ipp plain', '632/tcp ipp tls'],
                  'note': 'Protocols mapped by position: 515 LPR, 631 IPP; 632 IPPS.'},
    'others-38': {'endpoints': ['443/tcp http tls', '5671/tcp amqp tls'], 'ports': ([], [443, 5671]),
                  'note': 'Row is broken in the vendor text: "HTTPS + AMQP" sits in the secured port column '
                          'and the application cell is empty. Defaults HTTPS 443 and AMQPS 5671.'},
}
# Rows whose generic output is right but deserves a word for the reviewer.
NOTES = {
    'terminal-server-36': 'Application says HTTPS only, but the vendor gives 5021 as the unsecured port; '
                          'both columns are kept.',
    'terminal-server-47': 'Application says HTTP only, but the vendor gives 5022 as the secured port; '
                          'both columns are kept.',
    'payment-02': 'Application says HTTPS only, but the vendor gives 8080 as the unsecured port; '
                  'both columns are kept.',
    'microsoft-01': 'Vendor lists 80 as the secured port (443 would be usual); kept as given.',
    'others-37': 'Application says HTTP only, but the vendor lists 5000 as the secured port too.',
    'management-08': 'Row is broken in the vendor text: application cell empty, "ServerSync" in the data '
                     'column; SafeQ proprietary ServerSync port 4099, so protocol safeq.',
    'mfd-01': 'Application cell is empty; the device-alive check is an ICMP echo, no port.',
    'others-13': 'Vendor lists the same NetBIOS ports in both columns, so security is optional.',
    'others-14': 'Vendor lists the same NetBIOS ports in both columns, so security is optional.',
    'payment-04': 'Application says "over SSL/TLS", but the vendor gives 4196/4198 as unsecured ports; '
                  'both columns are kept.',
}
EXPECTED = {  # sanity check that FIXES / NOTES keys hit the intended rows (substring of the joined cells)
    'terminal-server-31': 'OKI sXP2|Terminal Server|389', 'terminal-server-42': 'MFD|Terminal Server|21, 1024',
    'payment-06': 'External Payment System', 'payment-08': 'User (termtool user utility)|Payment machine (SPM)||',
    'mfd-22': 'USB card reader', 'mfd-23': '515/9100/80', 'mfd-24': 'FTP - active', 'mfd-25': 'JetDirect',
    'terminal-pro-3-5-02': 'User (termtool user utility)|Terminal Professional (TPv3.5)||',
    'others-21': 'Payment machine (SPM)|User|', 'others-27': '–|End User Interface|9009',
    'others-33': 'System spooler (Windows)', 'others-34': 'System spooler (MAC)',
    'others-35': 'Spooler|File System', 'others-38': 'edge-config', 'workflow-processing-system-02': 'SMB/WebDAV',
    'terminal-server-36': 'Mobile terminal|Terminal Server|5021|5022|HTTPS|', 'terminal-server-47': 'SQTA',
    'payment-02': 'Web Interface', 'management-08': 'ServerSync', 'mfd-01': 'ICMP', 'payment-04': '4196/4198',
    'microsoft-01': 'Exchange', 'others-13': '137/138 (UDP)', 'others-14': '137/138 UDP', 'others-37': 'Job Service|Identity Server',
}
assert set(FIXES) | set(NOTES) <= set(EXPECTED)


def build() -> list[dict]:
    rows = read_rows()
    flows = []
    for r in rows:
        f = build_flow(r)
        if f['id'] in EXPECTED:
            assert EXPECTED[f['id']] in '|'.join(r[c] for c in COLUMNS), (f['id'], r)
        if f['id'] in NOTES:
            f['note'] = ' '.join(x for x in (f['note'], NOTES[f['id']]) if x)
        flows.append(f)
    return flows


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000, allow_unicode=True).strip()


def _scalar(key, value) -> str:
    return yaml.safe_dump({key: value}, sort_keys=False, width=10_000, allow_unicode=True).strip()


def dump_flows(flows: list[dict]) -> str:
    out = [FLOWS_HEADER]
    section = None
    for f in flows:
        if f['section'] != section:
            section = f['section']
            out.append(f'\n# ---- {section} ' + '-' * max(0, 70 - len(section)))
        lines = []
        for key, value in f.items():
            if key in ('unsecured', 'secured'):
                lines.append(f'{key}: {_flow(value)}')
            elif key == 'endpoints':
                lines.append('endpoints:' + ('' if value else ' []'))
                lines.extend(f'- {_flow(e)}' for e in value)
            else:
                lines.append(_scalar(key, value))
        out.append('- ' + '\n  '.join(lines))
    return '\n'.join(out) + '\n'


def dump_roles() -> str:
    out = [ROLES_HEADER]
    for rid, name, kind, aliases in ROLES:
        out.append(f'- id: {rid}\n  {_scalar("name", name)}\n  kind: {kind}\n  aliases: {_flow(aliases)}')
    return '\n'.join(out) + '\n'


FLOWS_HEADER = """\
# SafeQ 6 network flows: one entry per row of the vendor's "Network Communication" table
# (not redistributed with the project). Reviewed data owned by this project; the
# vendor text is never parsed at run time. Loaded and validated by emulator.catalog.
#
# id          section slug + 2-digit row; row is the 1-based position within the section
# *_text, network, application, data: the vendor's cells verbatim ('' if empty)
# unsecured / secured: the port cells: shape, text (verbatim), ports, ranges; is_default: true
#             when ports are our defaults for a cell without numbers (see note)
# endpoints   what the lab exercises: transport, port or port_range, protocol (wire id),
#             security plain|tls|starttls|optional, channel data for FTP data ranges
# note        why a default was chosen, or anything a reviewer should know
# why_not     non-empty = the row cannot be exercised in the lab, and why
#
# First generated by tools/import_seed.py, then reviewed and hand-fixed."""

ROLES_HEADER = """\
# Canonical roles of the SafeQ 6 flow catalog. aliases = every wording of the vendor table
# (client / server columns, verbatim) that means this role; '–' means no role.
# kind: safeq | terminal | device | client | external"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, required=True, help='directory for flows.yaml and roles.yaml')
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'flows.yaml').write_text(dump_flows(build()), encoding='utf-8')
    (args.out / 'roles.yaml').write_text(dump_roles(), encoding='utf-8')


if __name__ == '__main__':
    main()
