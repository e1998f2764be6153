"""A scripted vhost-user back-end on a thread: answers what the front-end asks and records it.

    backend = FakeBackend(tmp_path / "sock", features=..., protocol_features=...)
    frontend = VhostUserFrontend.connect(backend.path)
    ...
    backend.requests          # [(Request, flags, payload, number of fds)] in arrival order
    backend.fds[Request.SET_VRING_KICK]   # the fds that came with the last such request
    backend.close()

`silent` requests are never answered (reply timeouts), `hangup_on` closes the connection
when that request arrives, `reject` answers a NEED_REPLY with that non-zero status.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from pyvmm.vhost_user.protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, VERSION, VHOST_USER_F_PROTOCOL_FEATURES, Message, Request, VhostUserError,
    close_fds, decode_config, decode_u64, decode_vring_state, encode_config, encode_u64, encode_vring_state,
    recv_message, send_message,
)
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1


class FakeBackend:
    def __init__(self, path: str | Path, *, features: int = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
                 protocol_features: int = 0, queue_num: int = 1, config: bytes = b"",
                 silent: set[int] = frozenset(), hangup_on: int | None = None, reject: dict | None = None,
                 vring_base: int = 0) -> None:
        self.path = str(path)
        self.features, self.protocol_features = features, protocol_features
        self.queue_num, self.config, self.vring_base = queue_num, config, vring_base
        self.silent, self.hangup_on, self.reject = set(silent), hangup_on, dict(reject or {})
        self.requests: list[tuple[int, int, bytes, int]] = []
        self.fds: dict[int, list[int]] = {}
        self.acked_protocol_features = 0
        self.conn: socket.socket | None = None
        self.connected = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return [Request(code).name for code, *_ in self.requests]

    def payloads(self, request: int) -> list[bytes]:
        return [payload for code, _, payload, _ in self.requests if code == request]

    def _serve(self) -> None:
        try:
            self.conn, _ = self._listener.accept()
        except OSError:
            return
        self.connected.set()
        while True:
            try:
                message = recv_message(self.conn)
            except (VhostUserError, OSError):
                return
            self.requests.append((message.request, message.flags, message.payload, len(message.fds)))
            if message.fds:
                close_fds(self.fds.get(message.request, []))
                self.fds[message.request] = message.fds
            if message.request == self.hangup_on:
                self.conn.close()
                return
            if message.request in self.silent:
                continue
            reply = self._answer(message)
            if reply is None and message.flags & FLAG_NEED_REPLY:
                reply = encode_u64(self.reject.get(message.request, 0))
            if reply is not None:
                try:
                    send_message(self.conn, Message(message.request, VERSION | FLAG_REPLY, reply))
                except OSError:
                    return

    def _answer(self, message: Message) -> bytes | None:
        request = message.request
        if request == Request.GET_FEATURES:
            return encode_u64(self.features)
        if request == Request.GET_PROTOCOL_FEATURES:
            return encode_u64(self.protocol_features)
        if request == Request.SET_PROTOCOL_FEATURES:
            self.acked_protocol_features = decode_u64(message.payload)
        elif request == Request.GET_QUEUE_NUM:
            return encode_u64(self.queue_num)
        elif request == Request.GET_VRING_BASE:
            index, _ = decode_vring_state(message.payload)
            return encode_vring_state(index, self.vring_base)
        elif request == Request.GET_CONFIG:
            offset, size, flags, _ = decode_config(message.payload)
            data = self.config[offset:offset + size]
            return encode_config(offset, size, flags, data) if len(data) == size else b""
        return None

    def hang_up(self) -> None:
        self.connected.wait(5)
        self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() nobody answered
        except OSError:
            pass
        self._listener.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        if self.conn is not None:
            self.conn.close()
        for fds in self.fds.values():
            close_fds(fds)
        self.fds.clear()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
