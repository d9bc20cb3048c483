"""`network: false`: an agent's runs get a network namespace of their own with loopback
only; the daemon's socket still reaches them. Under the shipped unit (agent uids, user
namespaces): tests/test_systemd_isolation.py."""

from __future__ import annotations

import socket
import subprocess

from harness import DaemonProc
from support import require
from untrusted import probe_job, report_of

from supervisor.kernel import no_network

NET_PROBE = """
host_port = int(os.environ["HOST_PORT"])
def reach_host():
    socket.create_connection(("127.0.0.1", host_port), timeout=5).close()
def own_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    socket.create_connection(server.getsockname(), timeout=5).close()
report("net", {"ns": os.readlink("/proc/self/ns/net"),
               "interfaces": sorted(line.split(":")[0].strip()
                                         for line in open("/proc/self/net/dev").readlines()[2:]),
               "own loopback": attempt(own_loopback),
               "host port": attempt(reach_host),
               "heartbeat": call("heartbeat", {})["ok"]})
"""


def _namespaces_work() -> bool:
    return subprocess.run(no_network.argv_for(["true"]), capture_output=True).returncode == 0


def _network_probe_daemon(tmp_path, port: int) -> DaemonProc:
    def agent(network: bool) -> dict:
        return {"network": network,
                "jobs": [probe_job(NET_PROBE, env={"HOST_PORT": str(port)})]}
    return DaemonProc(tmp_path, {"online": agent(True), "offline": agent(False)})


def test_an_agent_with_network_off_sees_only_its_own_loopback(tmp_path):
    """A run of an agent with `network: false` is in a network namespace of its own holding
    only a working loopback: it cannot reach a port on the host's 127.0.0.1 that an agent
    with network can, and it still heartbeats through the daemon's socket."""
    require(_namespaces_work(), "needs network namespaces (root or unprivileged user namespaces)")
    with socket.socket() as host_server:
        host_server.bind(("127.0.0.1", 0))
        host_server.listen(8)
        with _network_probe_daemon(tmp_path, host_server.getsockname()[1]).start() as d:
            for name in ("online", "offline"):
                d.call("start-now", agent=name)
            online = report_of(d, "online", "net")
            offline = report_of(d, "offline", "net")
    assert online["host port"] == "ok" and online["heartbeat"] is True, online
    assert offline["ns"] != online["ns"], (offline, online)
    assert offline["interfaces"] == ["lo"], offline
    assert offline["own loopback"] == "ok", offline
    assert offline["host port"].startswith("denied"), offline
    assert offline["heartbeat"] is True, offline


def test_without_a_network_namespace_the_command_is_not_run(tmp_path, monkeypatch, capsys):
    """When the kernel refuses the namespace, the wrapper exits 126 with the reason and a
    hint, and never runs the command with the host's network."""
    def refuse(flags: int) -> None:  # what a kernel without user namespaces answers
        raise OSError(1, "unshare: Operation not permitted")
    monkeypatch.setattr(no_network, "unshare", refuse)
    marker = tmp_path / "ran"
    assert no_network.main(["touch", str(marker)]) == no_network.EXIT_NO_NAMESPACE
    assert not marker.exists()
    said = capsys.readouterr().err
    assert "network: false" in said and "unprivileged_userns_clone" in said
