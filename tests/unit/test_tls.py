"""TLS through the lab CA: the framed stub on a secured port, verified by the probe."""
from emulator import pki
from tests.support import free_port, run_stub
from tests.support import probe_targets as probe


def test_secured_port_speaks_tls_verified_by_chain_and_host_name(tmp_path):
    material = pki.make_test_pki(tmp_path / "pki", host="stub.lab", address="127.0.0.1")
    other_ca = pki.make_test_pki(tmp_path / "other", host="stub.lab")["ca_file"]
    port = free_port()
    listener = {"transport": "tcp", "port": port, "protocol": "terminal-x", "security": "tls"}
    base = {"host": "127.0.0.1", "transport": "tcp", "protocol": "safeq", "port": port, "security": "tls",
            "timeout": 5.0, "size": 48 * 1024}
    with run_stub(tmp_path, [listener], persona=material):
        good, wrong_ca, wrong_name, plain = probe([
            {**base, "id": "good", "server_name": "stub.lab", "ca_file": material["ca_file"]},
            {**base, "id": "wrong-ca", "server_name": "stub.lab", "ca_file": other_ca},
            {**base, "id": "wrong-name", "server_name": "elsewhere.lab", "ca_file": material["ca_file"]},
            {**base, "id": "plain", "security": "plain"},
        ])
    assert good["outcome"] == "ok" and good["exchange"].startswith("TLS framed"), good
    assert wrong_ca["outcome"] == "protocol_error" and "certificate" in wrong_ca["detail"], wrong_ca
    assert wrong_name["outcome"] == "protocol_error", wrong_name
    assert plain["outcome"] == "protocol_error", plain


def test_lab_certificates_are_marked_pre_installed_and_customer_ones_are_not(tmp_path):
    lab = pki.LabCA().write(tmp_path / "lab", [("site1", "198.18.1.12")])
    customer = pki.LabCA("ACME Corp Issuing CA").write(tmp_path / "acme", [("site1", "198.18.1.12")])
    assert pki.is_pre_installed(lab["site1"].cert_file)
    assert not pki.is_pre_installed(customer["site1"].cert_file)
    assert pki.load_pki_dir(str(tmp_path / "acme"), ["site1", "site2"]).keys() == {"site1"}
