"""Swapping in the customer's CA and certificates: the audit says which flows still use the lab's."""
from __future__ import annotations

import json

import pytest

from emulator import pki
from tests.lab.helpers import footprint, run_cli, small_topology

pytestmark = pytest.mark.lab


def test_customer_certificates_replace_the_pre_installed_ones(lab_host, tmp_path):
    topo = small_topology(tmp_path)
    customer = tmp_path / "acme"
    pki.LabCA("ACME Corp Issuing CA").write(customer, [("ts1", "198.18.100.10")])
    proc = run_cli("audit", "--topology", topo, "--certs", str(customer), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    verdicts = json.loads((tmp_path / "r.json").read_text())["verdicts"]
    tls = [v for v in verdicts if v["check"]["kind"] == "required" and v["check"]["endpoint"]
           and any(word in v["exchange"] for word in ("TLS", "HTTPS", "IPPS", "WebDAVS"))]
    to_ts1 = [v for v in tls if v["check"]["server"] == "ts1"]
    to_km1 = [v for v in tls if v["check"]["server"] == "km1"]
    assert to_ts1 and to_km1
    assert all(v["certificate"] == "" and v["verdict"] == "ALLOWED" for v in to_ts1), to_ts1
    assert all(v["certificate"] == "pre-installed" for v in to_km1), to_km1
    assert f"{len([v for v in verdicts if v['certificate']])} TLS flow checks still present" in proc.stdout
    assert footprint()["bridges"] == []


def test_a_certificate_directory_without_its_ca_is_one_line(lab_host, tmp_path):
    proc = run_cli("audit", "--topology", small_topology(tmp_path), "--certs", str(tmp_path))
    assert proc.returncode == 4
    assert proc.stderr.count("\n") == 1 and "has no ca.pem" in proc.stderr
    assert footprint()["bridges"] == []
