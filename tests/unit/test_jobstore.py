"""Documents passed along a workflow (emulator.protocols.jobstore): the bounded store, the job
metadata's size, the control channel's StoreQuery, and two whole chains over loopback sockets,
each hop a real exchange between stubs of different hosts: print (LPD -> framed accounting ->
SOAP job list -> RAW release) and scan (FTP -> WebDAV -> SMTP -> IMAP). The sha256 at the end is
the one the first hop created; a hop whose holder lacks the document fails and says why."""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

import roles as role_data
from emulator import jobs
from emulator.protocols import framed, ftp, http, imap, ipp, jobstore, lpd, payloads, raw, smtp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import free_port_pair, run_on_fresh_reactor

_runs = itertools.count(1)


def hosts(*names: str) -> dict[str, str]:
    """Host names of their own for one test: stores are per host and live as long as the process."""
    run = next(_runs)
    return {name: f'{name}-{run}-{id(names) % 10_000}' for name in names}


def persona(host: str, *role_ids: str) -> Persona:
    return Persona(host=host, roles=role_ids, identity=role_data.identity(list(role_ids)))


def target(protocol: str, port: int, carries: str, holder: str, size: int = 4096, **options) -> ProbeTarget:
    return ProbeTarget(id='t', host='127.0.0.1', transport='tcp', protocol=protocol, port=port, timeout=3.0,
                       size=size, options={'carries': carries, 'holder': holder, **options})


# -- the store ------------------------------------------------------------------------------------
def test_the_store_keeps_the_newest_per_name_and_kind_within_its_bounds():
    store = jobstore.JobStore(max_documents=3, max_bytes=10_000)
    first = store.keep(jobstore.document('a', 'print-job', b'x' * 100))
    store.keep(jobstore.document('a', 'accounting', b'y'))
    again = store.keep(jobstore.document('a', 'print-job', b'z' * 100))
    assert store.find('a', ('print-job',)) == again != first
    assert [d.kind for d in store.documents('a')] == ['accounting', 'print-job']
    for name in 'bcd':
        store.keep(jobstore.document(name, 'scan', b'q'))
    assert [d.name for d in store.documents()] == ['b', 'c', 'd']          # at most 3, oldest out
    store.keep(jobstore.document('big', 'scan', b'w' * 9_000))
    store.keep(jobstore.document('bigger', 'scan', b'w' * 9_000))
    assert [d.name for d in store.documents()][-1:] == ['bigger'] and store._kept() <= 10_000
    assert store._kept_bytes == store._kept()   # the running total the bound is checked against


def test_a_document_too_large_to_pass_on_is_kept_without_its_bytes(monkeypatch):
    monkeypatch.setattr(jobstore, 'MAX_DOCUMENT_BYTES', 10)
    doc = jobstore.document('a', 'scan', b'0123456789abc')
    assert (doc.size, doc.data, doc.sha256) == (13, None, hashlib.sha256(b'0123456789abc').hexdigest())
    holder = hosts('h')['h']
    jobstore.store_for(holder).keep(doc)
    assert 'without its bytes' in jobstore.need_held({'carries': 'a', 'holder': holder}, ('scan',))[1]


@pytest.fixture
def spool_dir(tmp_path):
    """The spool a lab daemon has (roled: ``<host>.spool`` in the run directory), removed after."""
    jobstore.spool_in(tmp_path / 'spool')
    yield tmp_path / 'spool'
    jobstore.drop_spool()
    jobstore.spool_in(None)


@pytest.fixture(params=['in memory', 'in spool files'])
def kept_where(request):
    """Chains run both ways: bytes in memory (no spool) and in spool files (a lab daemon)."""
    if request.param == 'in memory':
        yield None
        return
    yield request.getfixturevalue('spool_dir')


def test_a_spooled_store_keeps_bytes_in_files_and_only_their_entry_in_memory(spool_dir):
    store = jobstore.JobStore(max_documents=2, max_bytes=10_000)
    first = store.keep(jobstore.document('a', 'scan', b'x' * 100))
    assert first.data is None and first.kept and open(first.file, 'rb').read() == b'x' * 100
    assert first.with_content().data == b'x' * 100 and first.to_dict()['kept'] is True
    again = store.keep(jobstore.document('a', 'scan', b'y' * 100))      # replaced: the old file goes
    store.keep(jobstore.document('b', 'scan', b'z'))
    store.keep(jobstore.document('c', 'scan', b'w'))                    # 'a' evicted: its file goes
    assert sorted(p.name for p in spool_dir.iterdir()) == sorted(
        p.rsplit('/', 1)[-1] for p in (d.file for d in store.documents()))
    assert again.file not in {d.file for d in store.documents()} and len(store.documents()) == 2
    jobstore.drop_spool()
    assert not spool_dir.exists()


def test_a_hop_reads_a_spooled_document_back_to_pass_it_on(spool_dir):
    holder = hosts('h')['h']
    options = {'carries': 'scan-s', 'holder': holder}
    made, _ = jobstore.to_send(options, ('scan',), lambda: b'%PDF-1.4 spooled')
    assert made.data == b'%PDF-1.4 spooled'          # the probe sends the bytes it just made ...
    held = jobstore.store_for(holder).find('scan-s')
    assert held.data is None and held.file          # ... and the store keeps them in a file
    assert jobstore.need_held(options, ('scan',))[0].data == b'%PDF-1.4 spooled'
    assert jobstore.to_send(options, ('scan',), lambda: b'not this')[0].data == b'%PDF-1.4 spooled'
    assert jobstore.need_held(options, ('scan',), bytes_too=False)[0].data is None
    os.unlink(held.file)                            # gone (evicted) before the hop reads it
    assert 'its spool file is gone' in jobstore.need_held(options, ('scan',))[1]


def test_the_webdav_store_keeps_its_documents_in_spool_files(spool_dir):
    store = http.DavStore(max_bytes=100, max_docs=2)
    store.put('a.pdf', b'a' * 40, 'application/pdf', 1.0)
    store.put('b.pdf', b'b' * 40, 'application/pdf', 2.0)
    doc = store.docs['a.pdf']
    assert doc.data is None and doc.content() == b'a' * 40 and doc.size == 40
    assert doc.etag == '"' + hashlib.sha256(b'a' * 40).hexdigest()[:32] + '"'
    store.put('c.pdf', b'c' * 40, 'application/pdf', 3.0)             # 'a.pdf' evicted
    assert store.delete('b.pdf') and not store.delete('b.pdf')
    assert [p.read_bytes() for p in spool_dir.iterdir()] == [b'c' * 40] and list(store.docs) == ['c.pdf']


def test_documents_cross_the_control_channel_without_their_bytes():
    doc = jobstore.document('report-1', 'print-job', b'%!PS', via='lpr', peer='198.18.3.10', owner='alice')
    reply = jobs.parse_reply(jobs.StoreReply((doc,)).to_line())
    assert reply == jobs.StoreReply((doc.__class__(**{**doc.__dict__, 'data': None}),))
    assert json.loads(jobs.StoreReply((doc,)).to_line())['documents'][0]['kept'] is True
    assert jobs.parse_job(jobs.StoreQuery('report-1').to_line()) == jobs.StoreQuery('report-1')
    bad = jobs.parse_reply(b'{"documents": [{"name": "x", "kind": "stolen"}]}')
    assert isinstance(bad, jobs.JobError) and 'kind' in bad.error


def test_the_daemon_answers_a_store_query_with_what_its_stubs_kept():
    holder = hosts('mfd')['mfd']
    jobstore.store_for(holder).keep(jobstore.document('job-q', 'print-job', b'data'))
    server = jobs.JobServerFactory(Clock()).buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(jobs.StoreQuery('job-q').to_line() + b'{"store": 3}\n')
    first, second = [jobs.parse_reply(line) for line in transport.value().splitlines()]
    assert [d.name for d in first.documents] == ['job-q'] and first.documents[0].size == 4
    assert isinstance(second, jobs.JobError) and 'store must be' in second.error


@pytest.mark.parametrize('seed', range(8))
def test_job_metadata_is_40_to_60_kb_of_json_and_the_same_for_the_same_job(seed):
    sha = hashlib.sha256(bytes([seed])).hexdigest()
    data = payloads.job_metadata(f'job-{seed}', 'alice', 1234, sha)
    assert 40_000 <= len(data) < 60_000 and data == payloads.job_metadata(f'job-{seed}', 'alice', 1234, sha)
    assert json.loads(data)['job']['sha256'] == sha


# -- whole chains over loopback ----------------------------------------------------------------------
def chain(listeners, body):
    """Start each (module, listener protocol, persona) on 127.0.0.1; run body(reactor, ports); stop them."""
    async def run(reactor):
        ports = []
        try:
            for module, protocol, who in listeners:
                number = free_port_pair() if module is ftp else 0
                ports.append(module.listen(reactor, Listener('tcp', number, protocol), who, interface='127.0.0.1'))
            return await body(reactor, [p.getHost().port for p in ports])
        finally:
            for port in ports:
                await maybeDeferred(port.stopListening)
    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(run(r)), limit=30.0)


def test_a_print_job_is_accounted_listed_and_released_with_its_own_bytes(kept_where):
    h = hosts('pc1', 'site1', 'site2', 'mfd')
    site1 = persona(h['site1'], 'flexispooler', 'terminal-server', 'spooler-controller')

    async def body(reactor, ports):
        spool, accounting, soap, printer = ports
        results = [await lpd.probe(reactor, target('lpr', spool, 'rep-1', h['pc1'], size=300_000, user='alice'))]
        await deferLater(reactor, 0.05, lambda: None)   # the LPD stub keeps the job when the client closes
        results.append(await framed.probe(reactor, target('framed', accounting, 'rep-1', h['site1'])))
        results.append(await http.probe(reactor, target('soap', soap, 'rep-1', h['mfd'], operation='GetJobList')))
        results.append(await raw.probe(reactor, target('raw', printer, 'rep-1', h['site1'])))
        await deferLater(reactor, 0.05, lambda: None)
        return results

    results = chain([(lpd, 'lpr', site1), (framed, 'safeq', persona(h['site2'], 'spooler-controller')),
                     (http, 'soap', site1), (raw, 'raw', persona(h['mfd'], 'mfd'))], body)
    submitted, metadata, listed, released = results
    assert [r.outcome for r in results] == ['ok'] * 4, results
    created = jobstore.store_for(h['pc1']).find('rep-1', ('created',))
    assert created.size == 300_000 and created.owner == ''
    spooled = jobstore.store_for(h['site1']).find('rep-1', ('print-job',))
    assert (spooled.sha256, spooled.owner, spooled.via) == (created.sha256, 'alice', 'lpr')
    accounted = jobstore.store_for(h['site2']).find('rep-1', ('accounting',))
    assert accounted.sha256 == created.sha256 and 40_000 <= accounted.metadata_bytes < 60_000
    assert 'shows rep-1' in listed.detail and submitted.outcome == 'ok'
    printed = jobstore.store_for(h['mfd']).find('rep-1', ('print-job',))
    assert (printed.sha256, printed.size, printed.via) == (created.sha256, 300_000, 'raw')
    assert "job 'rep-1'" in released.exchange and "job 'rep-1' metadata" in metadata.exchange
    assert bool(spooled.file) == bool(printed.file) == (kept_where is not None)


def test_a_job_printed_over_ipp_is_released_over_ipp_with_its_own_bytes(kept_where):
    h = hosts('pc1', 'site1', 'mfd')

    async def body(reactor, ports):
        spool, printer = ports
        submitted = await ipp.probe(reactor, target('ipp', spool, 'ipp-1', h['pc1'], size=200_000, user='bob'))
        released = await ipp.probe(reactor, target('ipp', printer, 'ipp-1', h['site1']))
        return submitted, released

    submitted, released = chain([(ipp, 'ipp', persona(h['site1'], 'flexispooler')),
                                          (ipp, 'ipp', persona(h['mfd'], 'mfd'))], body)
    assert (submitted.outcome, released.outcome) == ('ok', 'ok'), (submitted, released)
    created = jobstore.store_for(h['pc1']).find('ipp-1', ('created',))
    spooled = jobstore.store_for(h['site1']).find('ipp-1', ('print-job',))
    printed = jobstore.store_for(h['mfd']).find('ipp-1', ('print-job',))
    assert created.size >= 200_000 and (spooled.sha256, spooled.owner, spooled.via) == (created.sha256, 'bob', 'ipp')
    assert (printed.sha256, printed.size, printed.via) == (created.sha256, created.size, 'ipp')


def test_a_hop_whose_holder_lacks_the_document_fails_and_says_so():
    h = hosts('site1', 'site2')

    async def body(reactor, ports):
        return await framed.probe(reactor, target('framed', ports[0], 'never-sent', h['site1']))

    result = chain([(framed, 'safeq', persona(h['site2'], 'spooler-controller'))], body)
    assert result.outcome == 'error' and 'holds no never-sent' in result.detail
    assert jobstore.store_for(h['site2']).documents() == ()


def test_a_scan_reaches_the_mailbox_and_its_reader_with_its_own_bytes(kept_where):
    h = hosts('mfd', 'ts', 'wps', 'mail')

    async def body(reactor, ports):
        upload, dav, smtp_port, imap_port = ports
        results = [await ftp.probe(reactor, target('ftp', upload, 'scan-9', h['mfd'], size=300_000))]
        await deferLater(reactor, 0.1, lambda: None)   # the FTP stub keeps the file from its own thread
        results.append(await http.probe(reactor, target('webdav', dav, 'scan-9', h['ts'])))
        results.append(await smtp.probe(reactor, target('smtp', smtp_port, 'scan-9', h['wps'])))
        results.append(await imap.probe(reactor, target('imap', imap_port, 'scan-9', h['ts'])))
        return results

    mail = persona(h['mail'], 'mail-server')
    results = chain([(ftp, 'ftp', persona(h['ts'], 'terminal-server')),
                     (http, 'webdav', persona(h['wps'], 'workflow-processing-system')),
                     (smtp, 'smtp', mail), (imap, 'imap', mail)], body)
    assert [r.outcome for r in results] == ['ok'] * 4, results
    created = jobstore.store_for(h['mfd']).find('scan-9', ('created',))
    assert created.size == 300_000 and created.with_content().data.startswith(b'%PDF-')
    assert bool(created.file) == (kept_where is not None)
    for host, kind, via in (('ts', 'scan', 'ftp'), ('wps', 'scan', 'webdav'), ('mail', 'mail', 'smtp'),
                            ('ts', 'mail', 'imap')):
        doc = jobstore.store_for(h[host]).find('scan-9', (kind,))
        assert (doc.sha256, doc.size, doc.via) == (created.sha256, created.size, via), (host, kind)
        if kind == 'scan':   # kept to pass on (a mail's bytes stay in its mailbox)
            assert bool(doc.file) == (kept_where is not None) and doc.kept, (host, kind)
