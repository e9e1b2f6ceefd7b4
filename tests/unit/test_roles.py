import roles
from emulator.catalog import load_catalog


def test_personas_name_only_catalog_roles():
    assert set(roles._personas()) <= set(load_catalog().roles)


def test_every_mfd_vendor_family_has_an_snmp_and_ipp_identity():
    catalog = load_catalog()
    for role_id in catalog.roles:
        if role_id.startswith("mfd-"):
            ident = roles.identity(["mfd", role_id])
            assert ident["sys_object_id"].startswith("1.3.6.1.4.1.") and ident["make_model"], role_id
            assert ident["vendor"], role_id


def test_vendor_identity_beats_the_generic_mfd():
    ident = roles.identity(["mfd", "mfd-konica-minolta"])
    assert ident["make_model"].startswith("KONICA MINOLTA")


def test_daemon_spec_carries_listeners_and_persona():
    spec = roles.daemon_spec("mfd-km", ["mfd", "mfd-konica-minolta"], "/tmp/x.jsonl",
                             persona={"address": "198.18.2.10"})
    assert spec["listeners"] and spec["persona"]["address"] == "198.18.2.10"
    assert spec["persona"]["identity"]["vendor"] == "Konica Minolta"


def test_a_port_plain_for_one_flow_and_starttls_for_another_serves_both():
    catalog = load_catalog()
    ldap = [l for l in roles.listeners(["terminal-server"], catalog) if l.protocol == "ldap"]
    securities = {l.port: l.security for l in ldap}
    starttls_ports = {ep.port for f in catalog.filter(role="terminal-server", protocol="ldap")
                      for ep in f.endpoints if ep.security == "starttls"}
    assert starttls_ports and all(securities[p] in ("optional", "starttls") for p in starttls_ports)


def test_no_host_port_is_plain_for_one_flow_and_tls_for_another():
    from emulator.topology import load_topology

    catalog = load_catalog()
    conflicts = []
    for host in load_topology("single-site").hosts:
        securities = {}
        for role in host.roles:
            for flow, ep in catalog.served_endpoints(role):
                if ep.port is not None:
                    securities.setdefault((ep.transport, ep.port), {}).setdefault(ep.security, flow.id)
        for key, seen in securities.items():
            if "tls" in seen and len(seen) > 1:
                conflicts.append((host.name, key, seen))
    assert conflicts == []


# -- the persona schema -----------------------------------------------------------------------------
import pytest  # noqa: E402

from emulator.protocols import http  # noqa: E402
from emulator.protocols.base import Persona  # noqa: E402
from emulator.protocols.persona_schema import FIELDS, PersonaError, check_identity  # noqa: E402


def load_personas(tmp_path, monkeypatch, text):
    path = tmp_path / "personas.yaml"
    path.write_text(text)
    monkeypatch.setattr(roles, "PERSONAS_FILE", path)
    roles._personas.cache_clear()
    try:
        return roles._personas()
    finally:
        roles._personas.cache_clear()


def test_identity_keeps_the_schema_types():
    ident = roles.identity(["mfd", "mfd-konica-minolta"])
    assert ident["printer"] is True and ident["color"] is True
    assert ident["page_count"] == 148213 and ident["pages_per_minute"] == 45
    assert ident["ipp_versions"] == ["1.0", "1.1", "2.0"] and "application/pdf" in ident["document_formats"]
    check_identity(ident, "merged")                       # the merge keeps every type
    assert set(ident) <= set(FIELDS)


def test_a_wrong_type_in_personas_yaml_is_a_one_line_error_naming_role_and_field(tmp_path, monkeypatch):
    with pytest.raises(PersonaError) as caught:
        load_personas(tmp_path, monkeypatch, "mfd-hp: {vendor: HP, page_count: lots}\n")
    message = str(caught.value)
    assert "\n" not in message and "mfd-hp" in message and "'page_count'" in message and "int" in message


def test_an_unknown_field_in_personas_yaml_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(PersonaError) as caught:
        load_personas(tmp_path, monkeypatch, "mfd-hp: {vendor: HP, pagecount: 12}\n")
    assert "\n" not in str(caught.value) and "mfd-hp" in str(caught.value) and "'pagecount'" in str(caught.value)


@pytest.mark.parametrize("field, value", [("printer", "yes"), ("page_count", True), ("page_count", "12"),
                                          ("sys_object_id", "enterprise"), ("document_formats", "a b"),
                                          ("passive_ports", [70000, 70001]), ("db_accounts", {"u": 1})])
def test_the_schema_rejects_wrong_types(field, value):
    with pytest.raises(PersonaError, match=rf"x: field '{field}' must be "):
        check_identity({field: value}, "x")


def test_a_persona_with_a_wrong_type_is_rejected_where_it_enters():
    with pytest.raises(ValueError, match="Persona.identity: field 'printer' must be bool"):
        Persona.from_dict({"host": "h", "roles": ["r"], "identity": {"printer": "true"}})


# -- what the role layer hands the protocol layer ---------------------------------------------------
def test_http_surfaces_name_endpoints_of_the_http_data():
    endpoints = set(http.load_surface().endpoints)
    for name in roles._http_surfaces()["endpoints"]:
        assert name in endpoints, name


def test_a_host_gets_the_http_surface_of_its_roles():
    ident = roles.identity(["terminal-server"])
    assert "terminal-login" in ident["http_endpoints"] and "install" not in ident["http_endpoints"]
    assert ident["http_soap"] is True and ident["http_webdav"] is True
    printer = roles.identity(["mfd", "mfd-ricoh"])
    assert printer["http_endpoints"] == ["install"] and not printer["http_soap"]


def test_probe_options_name_only_catalog_flows_and_known_requests():
    catalog = load_catalog()
    flows = {f.id: f for f in catalog.flows}
    surface = http.load_surface()
    for flow_id, options in roles._probe_options().items():
        assert flow_id in flows, flow_id
        protocols = {ep.protocol for ep in flows[flow_id].endpoints}
        if "endpoint" in options:
            assert "http" in protocols and options["endpoint"] in surface.endpoints, flow_id
        if "operation" in options:
            assert "soap" in protocols and options["operation"] in surface.soap_operations, flow_id
        if "document" in options:
            assert "ftp" in protocols, flow_id
