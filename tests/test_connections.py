"""`ClientSocket` on a socket pair: a response's head leaves with its body, in one send, and
a head held alone still leaves at the response's end or at close."""

import select
import socket

import pytest

from service.server.connections import ClientSocket, Closes, Deadlines, WaitingForHead


@pytest.fixture
def pair():
    server_end, client_end = socket.socketpair()
    sock = ClientSocket(
        server_end.detach(), Deadlines(5, 5, 5, 5), WaitingForHead(), Closes(lambda reason: None)
    )
    sock.request_started()
    yield sock, client_end
    sock.close()
    client_end.close()


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0.05)[0])


def test_the_head_is_held_until_the_body_and_both_leave_in_one_send(pair):
    sock, client = pair
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert not readable(client)  # held
    sock.sendall(b"{}")
    assert client.recv(65536) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def test_a_head_without_a_body_leaves_when_the_response_ends(pair):
    sock, client = pair
    sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert not readable(client)
    sock.request_finished()
    assert client.recv(65536) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_a_head_held_when_the_connection_closes_is_sent_first(pair):
    sock, client = pair
    sock.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
    sock.close()
    assert client.recv(65536) == b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    assert client.recv(65536) == b""


def test_the_next_response_is_held_again(pair):
    sock, client = pair
    sock.sendall(b"H1")
    sock.sendall(b"B1")
    sock.request_finished()
    assert client.recv(65536) == b"H1B1"
    sock.request_started()
    sock.sendall(b"H2")
    assert not readable(client)
    sock.sendall(b"B2")
    assert client.recv(65536) == b"H2B2"
