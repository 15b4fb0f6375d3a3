"""Unit tests of faasd.runtime_api's connection check: who owns a loopback socket
(asked of the kernel over netlink, or read from /proc/net/tcp), and which
process holds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from faasd.runtime_api import (
    Owner, _diag_owner, descendants, holds_socket, loopback_peer, proc_net_tcp_owner, process_uid,
)


def test_the_socket_table_names_the_owner_of_a_loopback_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, peer = listener.accept()
    try:
        listen_port, peer_port = listener.getsockname()[1], peer[1]
        assert peer_port == client.getsockname()[1]
        client_end = Owner(os.geteuid(), os.fstat(client.fileno()).st_ino)
        accepted_end = Owner(os.geteuid(), os.fstat(accepted.fileno()).st_ino)
        for lookup in (loopback_peer, _diag_owner, proc_net_tcp_owner):
            assert lookup(listen_port, peer_port) == client_end, lookup
            # The accepted end is the other way round: it is not the peer.
            assert lookup(peer_port, listen_port) == accepted_end, lookup
            assert lookup(listen_port, 1) is None, lookup
    finally:
        for sock in (accepted, client, listener):
            sock.close()


def test_the_table_is_read_in_the_kernels_byte_order(tmp_path):
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 0100007F:A001 01 00000000:00000000 00:00000000 00000000     0        0 51\n"
        "   1: 0100007F:A001 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 52\n")
    assert proc_net_tcp_owner(0x1F90, 0xA001, str(table)) == (1001, 52)  # the client end, port 40961
    assert proc_net_tcp_owner(0xA001, 0x1F90, str(table)) == (0, 51)
    assert proc_net_tcp_owner(0x1F90, 0xA002, str(table)) is None


def test_the_table_is_read_where_netlink_is_not_allowed(monkeypatch):
    from faasd import runtime_api

    def refused(listen_port: int, peer_port: int) -> Owner | None:
        raise PermissionError(13, "netlink refused")

    asked = []
    monkeypatch.setattr(runtime_api, "_diag_owner", refused)
    monkeypatch.setattr(runtime_api, "proc_net_tcp_owner",
                        lambda listen_port, peer_port: asked.append((listen_port, peer_port)) or Owner(7, 9))
    assert loopback_peer(8080, 40961) == (7, 9) and asked == [(8080, 40961)]


def test_a_process_uid_is_its_effective_uid_and_none_once_gone():
    assert process_uid(os.getpid()) == os.geteuid()
    assert process_uid(2 ** 22 + 1) is None  # above any pid_max


def test_a_socket_is_found_among_the_open_files_of_the_process_that_holds_it():
    listener = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen([sys.executable, "-c", "import sys, time, socket; "
                              "s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
                              "time.sleep(30)", str(listener.getsockname()[1])])
    try:
        accepted, peer = listener.accept()
        owner = loopback_peer(listener.getsockname()[1], peer[1])
        assert owner is not None
        assert holds_socket(child.pid, owner.inode)
        assert not holds_socket(os.getpid(), owner.inode)  # this process holds the other end
        assert child.pid in descendants(os.getpid())
        assert not holds_socket(2 ** 22 + 1, owner.inode)  # no such process
        accepted.close()
    finally:
        child.kill()
        child.wait()
        listener.close()
