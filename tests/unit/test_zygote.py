"""The zygote forks role daemons that serve like `python -m emulator.roled`, reports each one's
handshake and exit, and stops them when its stdin ends. No root: the daemons stay in the zygote's
own network namespace (netns 0) and bind 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

from emulator.zygote import Zygote, _parse_job


def _spec(tmp_path, host: str, port: int) -> str:
    spec = tmp_path / f"{host}.json"
    spec.write_text(json.dumps({"host": host, "roles": ["stub"], "interface": "127.0.0.1",
                                "listeners": [{"transport": "tcp", "port": port, "protocol": "raw"}]}))
    return str(spec)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def zygote(tmp_path):
    started = Zygote.launch(sys.executable, dict(os.environ), str(tmp_path / "zygote.stderr"))
    started.await_ready(60)
    yield started
    started.close()


def test_forked_daemons_serve_report_and_stop(zygote, tmp_path):
    ports = {f"h{i}": _free_port() for i in range(3)}
    for host, port in ports.items():
        zygote.spawn(host, 0, _spec(tmp_path, host, port), str(tmp_path / f"{host}.stderr"))
    assert zygote.await_started(ports, 30) == []
    assert {h: d.said for h, d in zygote.daemons.items()} == {h: "READY 1" for h in ports}
    pids = zygote.pids()
    assert len(set(pids)) == 3 and os.getpid() not in pids
    # when memory runs out, the kernel kills a daemon, never the lab process that tears the lab down
    assert {int(open(f"/proc/{pid}/oom_score_adj").read()) for pid in pids} == {1000}
    assert int(open("/proc/self/oom_score_adj").read()) < 1000
    for port in ports.values():  # each child serves its own listener
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    zygote.stop(["h1"])
    assert zygote.daemons["h1"].returncode == 0  # SIGTERM: a clean stop
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["h1"]), timeout=5)
    os.kill(zygote.daemons["h2"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while zygote.daemons["h2"].returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zygote.daemons["h2"].returncode == -signal.SIGKILL  # reaped and reported, never a zombie


def test_one_daemon_serves_a_group_and_stops_one_host_on_its_own(zygote, tmp_path):
    from emulator import jobs
    ports = {f"g{i}": _free_port() for i in range(3)}
    members = []
    for host, port in ports.items():
        spec = json.loads(open(_spec(tmp_path, host, port)).read())
        spec["control"] = str(tmp_path / f"{host}.ctl")
        (tmp_path / f"{host}.json").write_text(json.dumps(spec))
        members.append((host, 0, str(tmp_path / f"{host}.json")))
    zygote.spawn_group(members, str(tmp_path / "group.stderr"))
    assert zygote.await_started(ports, 30) == []
    assert {h: d.said for h, d in zygote.daemons.items()} == {h: "READY 2" for h in ports}  # listener + control
    assert len(zygote.pids()) == 1 and sorted(zygote.sharing("g0")) == ["g1", "g2"]
    with socket.socket(socket.AF_UNIX) as control:
        control.connect(str(tmp_path / "g1.ctl"))
        control.sendall(jobs.StopJob().to_line())
        assert jobs.parse_reply(control.makefile("rb").readline()) == jobs.StopReply(2)
    assert zygote.await_exited("g1", 10) and zygote.daemons["g1"].returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["g1"]), timeout=5)
    for host in ("g0", "g2"):  # the others serve on
        assert zygote.daemons[host].returncode is None
        socket.create_connection(("127.0.0.1", ports[host]), timeout=5).close()
    # the host alone again, in a process of its own; the group's end is not taken for its
    zygote.spawn("g1", 0, str(tmp_path / "g1.json"), str(tmp_path / "g1.stderr"))
    assert zygote.await_started(["g1"], 30) == [] and zygote.daemons["g1"].said == "READY 2"
    zygote.stop(["g0", "g2"])
    assert zygote.daemons["g0"].returncode == zygote.daemons["g2"].returncode == 0
    assert zygote.daemons["g1"].returncode is None
    socket.create_connection(("127.0.0.1", ports["g1"]), timeout=5).close()


def test_a_daemon_that_cannot_start_says_why(zygote, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    zygote.spawn("broken", 0, str(bad), str(tmp_path / "broken.stderr"))
    assert zygote.await_started(["broken"], 30) == []
    assert zygote.daemons["broken"].said.startswith("ERROR spec:")
    deadline = time.monotonic() + 10
    while zygote.daemons["broken"].returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zygote.daemons["broken"].returncode == 2


def test_end_of_stdin_stops_every_daemon(tmp_path):
    zygote = Zygote.launch(sys.executable, dict(os.environ), str(tmp_path / "zygote.stderr"))
    zygote.await_ready(60)
    port = _free_port()
    zygote.spawn("h", 0, _spec(tmp_path, "h", port), str(tmp_path / "h.stderr"))
    assert zygote.await_started(["h"], 30) == []
    pid = zygote.daemons["h"].pid
    zygote.proc.stdin.close()  # as when the lab that started it is killed
    assert zygote.proc.wait(timeout=30) == 0
    assert not os.path.exists(f"/proc/{pid}")


def _job(**change) -> str:
    member = {"host": "a", "netns": 0, "spec": "s", **change}
    return json.dumps({"hosts": [member], "stderr": "e"})


@pytest.mark.parametrize("job", ['"x"', '{"hosts": [], "stderr": "e"}', '{"hosts": ["a"], "stderr": "e"}',
                                 _job(host="a b"), _job(netns=-1), _job(netns=True), _job(spec=""),
                                 json.dumps({"hosts": [{"host": "a", "netns": 0, "spec": "s"}]})])
def test_bad_jobs_are_refused(job):
    with pytest.raises(ValueError):
        _parse_job(job)



# in a process of its own: the holes it fills stay taken for that process's life
_FILL_HOLES = """
import json, sys
from emulator import zygote
sizes = [size for size in range(1, 3000, 7) for _ in range(4)]   # pymalloc's and glibc's blocks
kept = [bytes(size) for size in sizes]
holes = {id(block) for block in kept[::2]}
del kept[::2]
if sys.argv[1] == "fill":
    zygote.fill_allocator_holes()
again = [bytes(size) for size in sizes[::2]]                      # what the freed blocks held
print(json.dumps([len(holes), sum(id(block) in holes for block in again)]))
"""


@pytest.mark.parametrize("fill", [False, True])
def test_after_the_zygote_fills_its_allocators_holes_new_objects_land_elsewhere(fill):
    import subprocess
    run = [sys.executable, "-c", _FILL_HOLES, "fill" if fill else "as is"]
    holes, reused = json.loads(subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout)
    if fill:   # a child's first objects would otherwise each copy the shared page around a hole
        assert reused < holes / 50
    else:      # the setup does make holes that new objects reuse
        assert reused > holes / 2


def test_job_lines_see_lines_already_read_as_pending():
    from emulator.zygote import _JobLines
    read, write = os.pipe()
    lines = _JobLines(read)
    assert not lines.pending(0.0)  # nothing yet: the zygote may build spares
    os.write(write, b'{"a": 1}\n{"b": 2}\n')
    assert lines.pending(0.0) and lines.readline() == '{"a": 1}'
    assert lines.pending(0.0)  # the second line sits in our buffer, where select cannot see it
    assert lines.readline() == '{"b": 2}' and not lines.pending(0.0)
    os.write(write, b"last")
    os.close(write)
    assert lines.readline() == "last" and lines.pending(0.0) and lines.readline() is None
    os.close(read)
