"""``http``: HTTP/HTTPS stubs and probes for REST (JSON), SOAP 1.1/1.2 and WebDAV.

One ``twisted.web`` Site per listener port serves all three, because one SafeQ port often
carries several catalog rows (Terminal Server 5021: REST for some terminals, SOAP for
Konica Minolta; an MFD's port 80: IPP and the terminal install page). Requests are told
apart the way real servers do:

* **SOAP** -- a POST with a ``SOAPAction`` header (SOAP 1.1, ``text/xml``) or a
  ``Content-Type: application/soap+xml`` (SOAP 1.2), on any path. The operation is the
  first element of the Body; its child elements are the parameters. Operations are data
  (``http_personas.yaml`` ``soap``: LoginByCard, LoginByPin, GetJobList, GetCredit, Logout).
  A malformed envelope, a DTD, an unknown operation or a missing parameter gets a SOAP
  Fault with HTTP 500 (``soap:Client`` in 1.1, ``env:Sender`` in 1.2).
* **WebDAV** -- under ``/scan/`` (data: ``webdav.collection``): one flat collection of
  scanned documents (bounded; their bytes in the jobstore's spool files in a lab daemon,
  in memory otherwise), class 1: OPTIONS, PROPFIND (Depth 0/1,
  207 Multi-Status), PUT (201 new / 204 replaced), GET/HEAD, DELETE.
* **REST** -- everything else: the endpoints of ``http_personas.yaml`` whose ``roles``
  match the persona's roles (job preview PNG on the Spooler Controller, accounting,
  terminal login and application data, IMS registration, payment credit, EUI login,
  MFD install page, ...), plus ``GET /`` (JSON health with the persona's host and roles)
  on every host. Unknown path: 404, wrong method: 405.

Every response carries ``Server:`` (persona ``identity['http_server']``) and two lab
headers, ``X-Lab-Host`` (who answered) and ``X-Lab-Peer`` (the client IP the server saw),
so a probe's result proves end to end which host answered and whom it saw. Every request
that reaches a resource is reported once through ``on_request`` when its response is
done: ``{'transport': 'tcp', 'port', 'peer', 'method', 'path', 'bytes' (request body),
'status', 'tls', ...}`` plus what the handler noted ('op', 'soap', 'stored', ...).

Bodies larger than ``MAX_BODY`` get ``413`` and a closed connection before they are read.

Security: ``tls`` listeners use implicit TLS with the persona's certificate
(``tls.listen_tls``). ``optional`` and ``starttls`` are served as plain HTTP (HTTP has no
upgrade anyone uses); probes say so in their exchange text.

Reuse by other modules (e.g. ``ipp``, whose printers serve IPP and the install page on one
port)::

    site = http.site_for(listener, persona, {b'ipp': ipp_resource, b'printers': ...},
                         reactor=reactor, on_request=on_request)
    port = http.listen_site(reactor, listener, persona, site, interface=interface)

or simply ``http.listen(..., extra_resources={...})``. A protocol that is HTTP underneath but
serves only its own API (``etcd``, ``infinispan``) mounts its root alone with
``http.lab_site(root, persona, reactor=..., on_request=...)`` and probes with
``http.run_plan(reactor, target, plan)``. Extra resources are children of
the root (``b'ipp'`` serves ``/ipp/...``); the key ``b''`` receives requests for ``/``
itself except GET/HEAD (which stay the health check). They inherit the Server and lab
headers and the ``on_request`` record; call ``http.note(request, op='Print-Job', ...)``
to add fields to that record instead of calling ``on_request`` yourself.

The probe (``probe``) uses ``twisted.web.client.Agent``; for HTTPS it connects with
``tls.client_creator(target)``, so the chain (target.ca_file) and host name
(target.server_name) are verified. What it asks depends on target.protocol and
target.options: ``endpoint`` (REST endpoint name; default the health check ``GET /``),
``operation`` (SOAP; default the data's ``default_operation``) and ``soap_version`` ('1.1' | '1.2'), ``size_floor`` (bytes; documents
smaller than this are sent at this size, default 200 KiB).

Layout: ``surface`` (the ``http_personas.yaml`` schema, loading and reply templates), ``soap``
and ``webdav`` (codecs), ``server`` (Site, channel, resources, ``lab_site``, ``listen``),
``client`` (the Agent-based client every HTTP-speaking probe uses, ``ipp``'s too) and ``plans``
(the probe and ``run_plan``). This package re-exports what other modules use.
"""

from __future__ import annotations

from ..payloads import check_png, make_png, print_job, scanned_pdf
from .client import HttpClient, HttpVerdict, Reject, Reply, classify_failure, expect, json_object
from .plans import DOC_FLOOR, probe, run_plan
from .server import IDLE_TIMEOUT, MAX_BODY, json_response, lab_site, listen, listen_site, note, respond, site_for
from .soap import SoapFault, fault_text, parse_soap, soap_envelope, soap_fault, soap_params
from .surface import DATA_FILE, DataError, Surface, check_fields, load_surface, parse_surface, render
from .webdav import DAV_MAX_DOCS, DAV_MAX_STORE, DavStore, parse_multistatus

PROTOCOL_IDS = ('http', 'soap', 'webdav')


def warm() -> None:
    load_surface()


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'warm',
           # server, for modules serving over it (ipp, etcd, infinispan)
           'site_for', 'lab_site', 'listen_site', 'note', 'respond', 'json_response', 'IDLE_TIMEOUT', 'MAX_BODY',
           # client, for modules probing over it
           'HttpClient', 'HttpVerdict', 'Reject', 'Reply', 'classify_failure', 'expect', 'json_object',
           'run_plan', 'DOC_FLOOR',
           # surface data and codecs
           'DATA_FILE', 'DataError', 'Surface', 'load_surface', 'parse_surface', 'render', 'check_fields',
           'SoapFault', 'soap_envelope', 'soap_fault', 'parse_soap', 'soap_params', 'fault_text',
           'DavStore', 'DAV_MAX_DOCS', 'DAV_MAX_STORE', 'parse_multistatus',
           # payloads the http probe sends and serves
           'make_png', 'check_png', 'scanned_pdf', 'print_job']
