"""VhostUserFrontend: pyvmm's end of one vhost-user connection (we share the rings, the back-end serves them).

Requests go out one at a time under a lock; each waits for its reply (or, once REPLY_ACK is
negotiated, for the back-end's acknowledgement) at most `timeout` seconds, so a hung
back-end becomes a `VhostUserTimeout` instead of a hung vCPU. After a timeout, a
disconnect or a malformed reply the connection is dead: a late reply would otherwise be
read as the answer to the next request. The socket is then shut down but its fd stays
open until close(), so an I/O thread watching it sees end-of-file rather than a reused fd.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Iterable

from .protocol import (
    CONFIG_FLAG_WRITABLE, FLAG_NEED_REPLY, VERSION, VERSION_MASK, VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryTableEntry, Message, ProtocolFeature, Request, VhostUserDisconnected, VhostUserError,
    VhostUserProtocolError, VhostUserTimeout, close_fds, decode_config, decode_u64, decode_vring_state,
    encode_config, encode_memory_table, encode_u64, encode_vring_addr, encode_vring_file,
    encode_vring_state, recv_message, request_name, send_message,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
CLOSED = "vhost-user back-end closed the connection"


class VhostUserFrontend:
    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT, path: str = "") -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._dead: str | None = None
        self.timeout = timeout
        self.path = path
        self.backend_features = 0            # GET_FEATURES, as the back-end offered them
        self.backend_protocol_features = 0   # GET_PROTOCOL_FEATURES
        self.protocol_features = 0           # what we enabled with SET_PROTOCOL_FEATURES
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> "VhostUserFrontend":
        path = str(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise VhostUserError(f"vhost-user socket {path} does not exist (is the back-end running?)") from None
        except ConnectionRefusedError:
            sock.close()
            raise VhostUserError(f"vhost-user back-end at {path} refused the connection "
                                 "(is it running?)") from None
        except TimeoutError:
            sock.close()
            raise VhostUserTimeout(f"vhost-user back-end at {path} did not accept the connection "
                                   f"within {timeout:g} s") from None
        except OSError as exc:
            sock.close()
            raise VhostUserError(f"cannot connect to vhost-user back-end at {path}: {exc.strerror}") from None
        return cls(sock, timeout=timeout, path=path)

    # --- connection state ------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def dead(self) -> str | None:
        """Why the connection can no longer be used, or None."""
        return self._dead

    def _kill(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def check_connection(self) -> str | None:
        """Without blocking: None while the connection is healthy, else why not (for an fd watcher).

        Between requests the back-end sends nothing, so a readable socket means it hung up.
        """
        with self._lock:
            if self._dead is not None:
                return self._dead
            try:
                self._sock.settimeout(0)
                data = self._sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            finally:
                if self._sock.fileno() >= 0:
                    self._sock.settimeout(self.timeout)
            self._kill(CLOSED if not data else "vhost-user back-end sent a message nobody asked for")
            return self._dead

    def close(self) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = "vhost-user connection is closed"
            self._sock.close()

    # --- one request ---------------------------------------------------------------------------------

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature.mask)

    def _request(self, request: Request, payload: bytes = b"", fds: Iterable[int] = (), *,
                 reply: bool = False) -> bytes | None:
        """Send one request; return the reply payload when the request has one (`reply`)."""
        name = request_name(request)
        with self._lock:
            if self._dead is not None:
                raise VhostUserDisconnected(self._dead)
            ack = not reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
            flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
            try:
                send_message(self._sock, Message(request, flags, payload, list(fds)))
                if not reply and not ack:
                    return None
                answer = recv_message(self._sock)
            except TimeoutError:
                self._kill(f"vhost-user back-end did not answer {name} within {self.timeout:g} s")
                raise VhostUserTimeout(self._dead) from None
            except VhostUserDisconnected:
                self._kill(CLOSED)
                raise VhostUserDisconnected(self._dead) from None
            except VhostUserProtocolError as exc:
                self._kill(str(exc))
                raise
            except OSError:  # EPIPE, ECONNRESET: the peer is gone
                self._kill(CLOSED)
                raise VhostUserDisconnected(self._dead) from None
            close_fds(answer.fds)  # no reply we ask for carries fds
            if answer.request != request or not answer.is_reply or answer.flags & VERSION_MASK != VERSION:
                self._kill(f"vhost-user back-end answered {name} with {request_name(answer.request)} "
                           f"(flags {answer.flags:#x})")
                raise VhostUserProtocolError(self._dead)
            if ack:
                try:
                    status = decode_u64(answer.payload)
                except VhostUserProtocolError as exc:
                    self._kill(str(exc))
                    raise
        if ack:
            if status:
                raise VhostUserError(f"vhost-user back-end rejected {name} (status {status:#x})")
            return None
        return answer.payload

    # --- requests ----------------------------------------------------------------------------------

    def negotiate(self, protocol_features: int = 0) -> None:
        """Session start: learn the back-end's features, enable the protocol features both sides
        want (of `protocol_features`, a mask of ProtocolFeature bits), take ownership."""
        self.backend_features = self.get_features()
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.backend_protocol_features = self.get_protocol_features()
            self.set_protocol_features(self.backend_protocol_features & protocol_features)
        self.set_owner()

    def _query(self, request: Request, payload: bytes = b"") -> bytes:
        """A request with a reply: its payload."""
        answer = self._request(request, payload, reply=True)
        assert answer is not None  # _request returns the payload of every reply it asked for
        return answer

    def get_features(self) -> int:
        return decode_u64(self._query(Request.GET_FEATURES))

    def set_features(self, features: int) -> None:
        self._request(Request.SET_FEATURES, encode_u64(features))

    def get_protocol_features(self) -> int:
        return decode_u64(self._query(Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        self._request(Request.SET_PROTOCOL_FEATURES, encode_u64(features))
        self.protocol_features = features  # REPLY_ACK applies from the next request on

    def set_owner(self) -> None:
        self._request(Request.SET_OWNER)

    def reset_owner(self) -> None:
        """Deprecated by the spec (back-ends differ on what it resets); prefer reset_device()."""
        self._request(Request.RESET_OWNER)

    def reset_device(self) -> None:
        if not self.has_protocol_feature(ProtocolFeature.RESET_DEVICE):
            raise VhostUserError("vhost-user back-end does not support RESET_DEVICE")
        self._request(Request.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return decode_u64(self._query(Request.GET_QUEUE_NUM))

    def set_mem_table(self, entries: list[MemoryTableEntry]) -> None:
        payload, fds = encode_memory_table(entries)
        self._request(Request.SET_MEM_TABLE, payload, fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._request(Request.SET_VRING_NUM, encode_vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self._request(Request.SET_VRING_BASE, encode_vring_state(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop ring `index`; returns the next available-ring index the back-end would have read."""
        reply_index, base = decode_vring_state(self._query(Request.GET_VRING_BASE, encode_vring_state(index, 0)))
        if reply_index != index:
            raise VhostUserProtocolError(f"vhost-user back-end answered GET_VRING_BASE for ring {index} "
                                         f"about ring {reply_index}")
        return base

    def set_vring_addr(self, index: int, *, desc: int, used: int, avail: int, flags: int = 0,
                       log_addr: int = 0) -> None:
        """Ring addresses in *our* address space (userspace addresses), not guest-physical ones."""
        self._request(Request.SET_VRING_ADDR,
                      encode_vring_addr(index, desc=desc, used=used, avail=avail, flags=flags, log=log_addr))

    def _set_vring_file(self, request: Request, index: int, fd: int | None) -> None:
        self._request(request, encode_vring_file(index, fd is not None), () if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_file(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_file(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_file(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enabled: bool) -> None:
        self._request(Request.SET_VRING_ENABLE, encode_vring_state(index, int(enabled)))

    def get_config(self, offset: int, size: int) -> bytes:
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            raise VhostUserError("vhost-user back-end does not offer its configuration space (no CONFIG feature)")
        payload = self._request(Request.GET_CONFIG, encode_config(offset, size), reply=True)
        if not payload:  # the spec's way of saying no
            raise VhostUserError(f"vhost-user back-end refused GET_CONFIG of {size} bytes at offset {offset}")
        reply_offset, reply_size, _, data = decode_config(payload)
        if (reply_offset, reply_size) != (offset, size):
            raise VhostUserProtocolError(f"vhost-user back-end answered GET_CONFIG {offset}+{size} "
                                         f"with {reply_offset}+{reply_size}")
        return data

    def set_config(self, offset: int, data: bytes, flags: int = CONFIG_FLAG_WRITABLE) -> None:
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            raise VhostUserError("vhost-user back-end does not offer its configuration space (no CONFIG feature)")
        self._request(Request.SET_CONFIG, encode_config(offset, len(data), flags, data))
