"""Unit tests of faasd.runtime_api's connection check: who owns a loopback socket
(asked of the kernel over netlink, or read from /proc/net/tcp)."""

from __future__ import annotations

import os
import socket

from faasd.runtime_api import _diag_uid, loopback_peer_uid, proc_net_tcp_uid, process_uid


def test_the_socket_table_names_the_owner_of_a_loopback_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, peer = listener.accept()
    try:
        listen_port, peer_port = listener.getsockname()[1], peer[1]
        assert peer_port == client.getsockname()[1]
        for lookup in (loopback_peer_uid, _diag_uid, proc_net_tcp_uid):
            assert lookup(listen_port, peer_port) == os.geteuid(), lookup
            # The accepted end is the other way round: it is not the peer.
            assert lookup(peer_port, listen_port) == os.geteuid(), lookup
            assert lookup(listen_port, 1) is None, lookup
    finally:
        for sock in (accepted, client, listener):
            sock.close()


def test_the_table_is_read_in_the_kernels_byte_order(tmp_path):
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 0100007F:A001 01 00000000:00000000 00:00000000 00000000     0        0 1\n"
        "   1: 0100007F:A001 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 2\n")
    assert proc_net_tcp_uid(0x1F90, 0xA001, str(table)) == 1001  # the client end, port 40961
    assert proc_net_tcp_uid(0xA001, 0x1F90, str(table)) == 0
    assert proc_net_tcp_uid(0x1F90, 0xA002, str(table)) is None


def test_the_table_is_read_where_netlink_is_not_allowed(monkeypatch):
    from faasd import runtime_api

    def refused(listen_port: int, peer_port: int) -> int | None:
        raise PermissionError(13, "netlink refused")

    asked = []
    monkeypatch.setattr(runtime_api, "_diag_uid", refused)
    monkeypatch.setattr(runtime_api, "proc_net_tcp_uid",
                        lambda listen_port, peer_port: asked.append((listen_port, peer_port)) or 7)
    assert loopback_peer_uid(8080, 40961) == 7 and asked == [(8080, 40961)]


def test_a_process_uid_is_its_effective_uid_and_none_once_gone():
    assert process_uid(os.getpid()) == os.geteuid()
    assert process_uid(2 ** 22 + 1) is None  # above any pid_max
