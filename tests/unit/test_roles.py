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
