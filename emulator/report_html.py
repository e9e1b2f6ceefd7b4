"""report.html: one self-contained page (inline CSS and JavaScript, nothing fetched) of an audit.

Rendered from the report.json document (emulator.report_json), so both always say the same:
the verdict and exit status in words, the deployment profile, rules and timings; the zone x zone
matrix coloured by its worst verdict (click a cell to list its checks); what is wrong, each with
the responsible rule, the suggested fix and a link to its pcap (`--pcap`); for a differential
audit the changed checks side by side; and every listed check in a table filtered by text, verdict
and zone pair. The page works from a file:// URL and from a CI server's artifact store; its
Content-Security-Policy forbids every fetch, so it cannot reach the network even by mistake.

Elements tests and scripts may rely on: `td.cell[data-client-zone][data-server-zone]` with
`data-status` and `data-count-<verdict>` (lower case, e.g. data-count-blocked); `tr.finding` and
`tr.check` with `data-key`, `data-verdict`, `data-client-zone`, `data-server-zone` and cells
`td.rule`, `td.fix`; `tr.change` (differential) with `data-key`; `<html data-ready="yes">` once the
script ran.
"""
from __future__ import annotations

import html
import json

from emulator.report_json import final_audit
from emulator.report_model import CODES, FINDING_ORDER

_STATUS_WORDS = {"fail": "a firewall finding", "lab": "lab faults only", "ok": "required flows pass",
                 "same": "same segment, no firewall", "closed": "exposure knocks only, all closed",
                 "none": "nothing between these zones"}
_CHECK_COLUMNS = ("verdict", "flow", "client", "server", "port", "protocol", "expected", "observed", "exchange",
                  "detail", "rule", "fix", "pcap")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f0f0f0}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
.status{font-weight:bold;padding:.4em .6em;display:inline-block;border-radius:4px}
.status.pass{background:#d4edda}.status.fail{background:#f8d7da}
.matrix td.cell{min-width:5em;text-align:center;cursor:pointer;font-family:ui-monospace,monospace}
.matrix td.cell.selected{outline:3px solid #0a58ca}
.s-fail{background:#f5a3a9}.s-lab{background:#e2c6f0}.s-ok{background:#bfe5c6}.s-same{background:#d6e4f0}
.s-closed{background:#f4f4f4;color:#777}.s-none{background:#fff;color:#bbb}
tr.v-BLOCKED td.verdict,tr.v-BROKEN td.verdict,tr.v-EXPOSED td.verdict{background:#f5a3a9;font-weight:bold}
tr.v-LAB-ERROR td.verdict,tr.v-NO-SERVICE td.verdict{background:#e2c6f0}
tr.v-UNENCRYPTED td.verdict{background:#fff3cd}tr.v-ALLOWED td.verdict{background:#bfe5c6}
tr.wrong td.verdict::after{content:" \\2716"}
.legend span{display:inline-block;padding:0 .5em;margin-right:.3em;border:1px solid #ccc}
#controls{margin:.5em 0}#controls input{width:28em}
td.rule,td.fix{font-family:ui-monospace,monospace;font-size:12px;max-width:40em;word-break:break-word}
.side{display:grid;grid-template-columns:1fr 1fr;gap:0}
"""

_JS = """
(function(){
  'use strict';
  var rows = Array.prototype.slice.call(document.querySelectorAll('#checks tbody tr.check'));
  var text = document.getElementById('filter-text');
  var verdict = document.getElementById('filter-verdict');
  var wrongOnly = document.getElementById('filter-wrong');
  var shown = document.getElementById('shown');
  var pair = null;
  var haystack = rows.map(function(r){ return r.textContent.toLowerCase(); });
  function apply(){
    var needle = text.value.trim().toLowerCase(), want = verdict.value, n = 0;
    rows.forEach(function(r, i){
      var ok = (!needle || haystack[i].indexOf(needle) >= 0) && (!want || r.dataset.verdict === want)
        && (!wrongOnly.checked || r.classList.contains('wrong'))
        && (!pair || (r.dataset.clientZone === pair[0] && r.dataset.serverZone === pair[1]));
      r.hidden = !ok; if (ok) { n++; }
    });
    shown.textContent = n + ' of ' + rows.length + ' checks shown' + (pair ? ' (' + pair[0] + ' \\u2192 ' + pair[1] + ')' : '');
  }
  document.querySelectorAll('.matrix td.cell').forEach(function(cell){
    cell.addEventListener('click', function(){
      var same = pair && pair[0] === cell.dataset.clientZone && pair[1] === cell.dataset.serverZone;
      document.querySelectorAll('.matrix td.cell.selected').forEach(function(c){ c.classList.remove('selected'); });
      pair = same ? null : [cell.dataset.clientZone, cell.dataset.serverZone];
      if (!same) { cell.classList.add('selected'); }
      apply();
      document.getElementById('checks').scrollIntoView();
    });
  });
  document.getElementById('filter-clear').addEventListener('click', function(){
    text.value = ''; verdict.value = ''; wrongOnly.checked = false; pair = null;
    document.querySelectorAll('.matrix td.cell.selected').forEach(function(c){ c.classList.remove('selected'); });
    apply();
  });
  [text, verdict, wrongOnly].forEach(function(el){ el.addEventListener('input', apply); el.addEventListener('change', apply); });
  apply();
  document.documentElement.dataset.ready = 'yes';
})();
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def render(document: dict) -> str:
    audit = final_audit(document)
    differential = document["kind"] == "differential"
    status = audit["exit_status"]
    verdict_text = ("PASS" if status == 0 else "FAIL") + f" ({audit['exit_status_words']})"
    title = f"safeq-lab audit of {audit['topology']}: {verdict_text}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>safeq-lab {'differential ' if differential else ''}audit of {_e(audit['topology'])}</h1>",
        f'<p class="status {"pass" if status == 0 else "fail"}" id="verdict">{_e(verdict_text)}</p>',
        _overview(document, audit),
        _matrix(audit),
    ]
    if differential:
        parts.append(_changes(document))
    parts += [_findings(audit), _checks(audit), f"<script>{_JS}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _overview(document: dict, audit: dict) -> str:
    profile = audit.get("profile") or {}
    choices = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in (profile.get("choices") or {}).items())
    rows = [("topology", audit["topology"])]
    if document["kind"] == "differential":
        rows += [("rules before", document["before"]["rules"]), ("rules after", audit["rules"])]
    else:
        rows.append(("rules", audit["rules"]))
    rows += [("profile", f"SafeQ {profile.get('version', '?')}, security {profile.get('security', '?')}"
              + (f", choices {choices}" if choices else "")),
             ("totals", ", ".join(f"{k} {n}" for k, n in sorted(audit["counts"].items(), key=lambda kv: -kv[1]))),
             ("egress", f"{audit['egress_drops']} packets to addresses outside the lab were dropped"),
             ("generated", f"{document['generated']} by {document['generator']} (report schema {document['schema']})")]
    timings = "".join(f"<tr><td>{_e(k)}</td><td class=\"mono\">{v:.1f} s</td></tr>" for k, v in audit["timings"].items())
    listing = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return (f'<section id="overview"><h2>Profile, rules and timings</h2><table id="profile">{listing}</table>'
            f'<h3>Timings</h3><table id="timings">{timings or "<tr><td>none recorded</td></tr>"}</table></section>')


def _matrix(audit: dict) -> str:
    cells = {(c["client_zone"], c["server_zone"]): c for c in audit["matrix"]}
    extra = sorted({z for (a, b), c in cells.items() for z in (a, b) if c["status"] != "none"} - set(audit["zones"]))
    names = [*audit["zones"], *extra]
    head = "".join(f"<th>{_e(z)}</th>" for z in names)
    body = []
    for a in names:
        row = [f"<th>{_e(a)}</th>"]
        for b in names:
            cell = cells.get((a, b), {"status": "none", "counts": {}})
            row.append(_cell(a, b, cell, audit["profile"]))
        body.append("<tr>" + "".join(row) + "</tr>")
    legend = "".join(f'<span class="s-{s}">{_e(words)}</span>' for s, words in _STATUS_WORDS.items())
    return (f'<section id="zones"><h2>Zone \u00d7 zone</h2><p>Clients\u2019 zones down, servers\u2019 zones across; '
            f'a cell lists the findings between them, or how many required flow checks pass. Click a cell to list '
            f'its checks.</p><table class="matrix"><thead><tr><th>from \\ to</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table><p class="legend">{legend}</p></section>')


def _cell(client_zone: str, server_zone: str, cell: dict, profile: dict) -> str:
    counts = cell["counts"]
    forbid = (profile or {}).get("security") == "secured-only"
    wrong = [(v, counts.get(str(v), 0)) for v in FINDING_ORDER
             if counts.get(str(v)) and (str(v) != "UNENCRYPTED" or forbid)]
    passed = counts.get("ALLOWED", 0) + (0 if forbid else counts.get("UNENCRYPTED", 0))
    if wrong:
        text = " ".join(f"{CODES[v]}{n}" for v, n in wrong)
    else:
        text = {"ok": f"ok {passed}", "same": "same", "closed": "\u2013"}.get(cell["status"], "")
    data = " ".join(f'data-count-{_e(k.lower())}="{n}"' for k, n in sorted(counts.items()))
    title = f"{client_zone} \u2192 {server_zone}: " + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "nothing")
    return (f'<td class="cell s-{_e(cell["status"])}" data-client-zone="{_e(client_zone)}" '
            f'data-server-zone="{_e(server_zone)}" data-status="{_e(cell["status"])}" {data} '
            f'title="{_e(title)}">{_e(text)}</td>')


def _pcap_link(audit: dict, v: dict) -> str:
    if v.get("pcap"):
        href = f"{audit.get('pcap_dir', 'pcap')}/{v['pcap']}"
        return f'<a class="pcap" href="{_e(href)}">{_e(v["pcap"])}</a> ({_e(v["pcap_packets"])} packets)'
    return _e(v.get("pcap_note") or "")


def _findings(audit: dict) -> str:
    by_id = {v["id"]: v for v in audit["verdicts"]}
    wrong = [by_id[i] for i in audit["findings"] if i in by_id]
    if not wrong:
        return ('<section id="findings"><h2>What is wrong</h2><p id="nothing-wrong">Nothing: every required flow '
                'passes, nothing is exposed, no lab fault.</p></section>')
    rows = []
    for v in wrong:
        c = v["check"]
        rows.append(
            f'<tr class="finding v-{_e(v["verdict"])}" data-key="{_e(v["key"])}" data-verdict="{_e(v["verdict"])}" '
            f'data-client-zone="{_e(v["client_zone"])}" data-server-zone="{_e(v["server_zone"])}">'
            f'<td class="verdict">{_e(v["verdict"])}</td>'
            f'<td>{_e(c["flow"] or "(exposure)")}<br>{_e(c["client"])} \u2192 {_e(c["server"])} '
            f'<span class="mono">{_e(c["endpoint"])}</span> {_e(c["protocol"] or "")}</td>'
            f'<td>{_e(v["client_zone"])} \u2192 {_e(v["server_zone"])}</td><td>{_e(v["detail"])}</td>'
            f'<td class="rule">{_e(v["rule"])}</td><td class="fix">{_e(v["suggestion"])}</td>'
            f'<td>{_pcap_link(audit, v)}</td></tr>')
    return (f'<section id="findings"><h2>What is wrong ({len(wrong)})</h2><table id="finding-table"><thead><tr>'
            '<th>verdict</th><th>check</th><th>zones</th><th>reason</th><th>responsible rule</th>'
            f'<th>suggested fix</th><th>pcap</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _changes(document: dict) -> str:
    rows = []
    for change in document["changed"]:
        c, old, new = change["check"], change["before"], change["after"]
        rows.append(
            f'<tr class="change" data-key="{_e(change["key"])}"><td>{_e(c["flow"] or "(exposure)")}<br>'
            f'{_e(c["client"])} \u2192 {_e(c["server"])} <span class="mono">{_e(c["endpoint"])}</span></td>'
            f'<td class="verdict v-{_e(old["verdict"])}">{_e(old["verdict"])}</td><td class="rule">{_e(old["rule"])}</td>'
            f'<td class="verdict v-{_e(new["verdict"])}">{_e(new["verdict"])}</td><td class="rule">{_e(new["rule"])}</td>'
            f'<td class="fix">{_e(new.get("fix", ""))}</td></tr>')
    before, after = document["before"]["rules"], document["after"]["rules"]
    body = "".join(rows) or '<tr><td colspan="6">no check changed its verdict</td></tr>'
    return (f'<section id="changes"><h2>Changed checks ({len(document["changed"])})</h2>'
            f'<p>Before: <code>{_e(before)}</code>; after: <code>{_e(after)}</code>.</p>'
            '<table id="change-table"><thead><tr><th rowspan="2">check</th><th colspan="2">before</th>'
            '<th colspan="2">after</th><th rowspan="2">fix</th></tr><tr><th>verdict</th><th>rule</th>'
            f'<th>verdict</th><th>rule</th></tr></thead><tbody>{body}</tbody></table></section>')


def _checks(audit: dict) -> str:
    verdicts = sorted({v["verdict"] for v in audit["verdicts"]})
    options = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in verdicts)
    rows = []
    for v in audit["verdicts"]:
        c = v["check"]
        cells = (v["verdict"], c["flow"] or "(exposure)", c["client"], c["server"], c["endpoint"], c["protocol"],
                 v["expected"], v["observed"], v["exchange"], v["detail"], v["rule"], v["suggestion"] or v["fix"])
        classes = ("verdict", "", "", "", "mono", "", "", "", "", "", "rule", "fix")
        tds = "".join(f'<td class="{cls}">{_e(text)}</td>' if cls else f"<td>{_e(text)}</td>"
                      for text, cls in zip(cells, classes))
        rows.append(f'<tr class="check v-{_e(v["verdict"])}{" wrong" if v["wrong"] else ""}" data-key="{_e(v["key"])}" '
                    f'data-verdict="{_e(v["verdict"])}" data-client-zone="{_e(v["client_zone"])}" '
                    f'data-server-zone="{_e(v["server_zone"])}">{tds}<td>{_pcap_link(audit, v)}</td></tr>')
    closed = "" if audit["closed_listed"] else (
        f' Closed exposure knocks ({audit["counts"].get("CLOSED", 0)}) are counted in the matrix, not listed '
        "(list them with --all).")
    head = "".join(f"<th>{_e(c)}</th>" for c in _CHECK_COLUMNS)
    return (f'<section id="all-checks"><h2>Checks</h2><p>{len(audit["verdicts"])} checks listed.{_e(closed)}</p>'
            '<div id="controls"><input id="filter-text" type="search" placeholder="filter: host, port, flow, rule ...">'
            f' <select id="filter-verdict"><option value="">every verdict</option>{options}</select>'
            ' <label><input id="filter-wrong" type="checkbox"> only what is wrong</label>'
            ' <button id="filter-clear" type="button">clear</button> <span id="shown"></span></div>'
            f'<table id="checks"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<script type="application/json" id="report-data">{_embedded(audit)}</script></section>')


def _embedded(audit: dict) -> str:
    """The counts and findings as JSON for scripts reading the page; `</` escaped so it cannot end the element."""
    data = {k: audit[k] for k in ("topology", "rules", "counts", "exit_status", "findings")}
    return json.dumps(data).replace("</", "<\\/")
