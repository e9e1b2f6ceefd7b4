"""The firewall's kernel record: the nft table text and the parsing of its sets."""
import json
import subprocess

import pytest

from emulator import witness

SRC, DST = "198.18.3.10", "198.18.1.10"


def listing(**sets):
    items = [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": witness.TABLE}}]
    for name, elements in sets.items():
        items.append({"set": {"family": "inet", "name": name, "table": witness.TABLE,
                              "elem": [{"concat": list(e)} for e in elements]}})
    return json.dumps({"nftables": items})


def test_seen_but_not_passed_is_a_drop_and_replies_are_recorded():
    record = witness.parse_record("fw", listing(
        seen=[(SRC, DST, "tcp", 389), (SRC, DST, "tcp", 9898), (SRC, DST, "udp", 161)],
        passed=[(SRC, DST, "tcp", 389), (SRC, DST, "udp", 161)],
        replied=[(SRC, DST, "tcp", 389)],
        pings_seen=[(SRC, DST)], pings_passed=[(SRC, DST)], pings_replied=[]))
    assert record.fate(SRC, DST, "tcp", 389) == witness.Fate(True, True, True)
    assert record.fate(SRC, DST, "tcp", 9898).dropped
    assert record.fate(SRC, DST, "udp", 161) == witness.Fate(True, True, False)  # a stateless reply drop
    assert record.fate(SRC, DST, "icmp", None) == witness.Fate(True, True, False)
    assert not record.fate(DST, SRC, "tcp", 389).seen  # keys are directional


def test_dropped_ftp_data_connections_between_two_hosts_either_way():
    record = witness.parse_record("fw", listing(
        seen=[(SRC, DST, "tcp", 21), (SRC, DST, "tcp", 30001), (DST, SRC, "tcp", 40000), (SRC, "198.18.1.11", "tcp", 1)],
        passed=[(SRC, DST, "tcp", 21)]))
    assert record.dropped_between(SRC, DST) == [(DST, SRC, "tcp", 40000), (SRC, DST, "tcp", 30001)]


@pytest.mark.parametrize("text", ["", "not json", "[]", json.dumps({"nftables": [{"set": {"name": "seen"}}]}),
                                  json.dumps({"nftables": [{"set": {"table": witness.TABLE, "name": "seen",
                                                                     "elem": [{"concat": ["x"]}, 7, None]}}]})])
def test_a_damaged_listing_gives_an_empty_record_not_a_crash(text):
    record = witness.parse_record("fw", text)
    assert not record.seen and not record.passed


def test_the_table_hooks_before_and_after_every_filter_chain():
    text = witness.table_text()
    assert f"priority {witness.WITNESS_PRIORITY};" in text and "priority -190;" in text
    for hook in ("prerouting", "forward", "input", "output"):
        assert f"hook {hook} " in text
    assert all(f"set {name} " in text for name in witness.SETS)
    assert witness.flush_text().count("flush set") == len(witness.SETS)


@pytest.mark.lab
def test_the_table_loads_twice_without_doubling_and_flushes(lab_host, tmp_path):
    table, flush = tmp_path / "witness.nft", tmp_path / "flush.nft"
    table.write_text(witness.table_text())
    flush.write_text(witness.flush_text())
    # each load is its own transaction, as in the lab
    script = f"nft -f {table} && nft -f {table} && nft -f {flush} && nft list table inet {witness.TABLE}"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("add @seen") == 2  # prerouting and output, once each
