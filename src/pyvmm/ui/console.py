"""The console page's WebSocket joined to a VM's console socket (api/console.py).

Each viewer is an attach of its own to the VM's console hub, which copies the guest's output
to every attached client: several pages (and `pyvmm console` terminals) watch and type at
once. The history the attach replays goes first, then the live output, as binary messages
(xterm.js decodes UTF-8 across them); what the page sends is typed into the guest.
"""

from __future__ import annotations

import socket
import threading

from .websocket import WebSocket, WebSocketClosed


def bridge_console(ws: WebSocket, console: socket.socket, history: bytes) -> None:
    """Copy both ways until either side ends; then close both (the VM runs on)."""

    def guest_to_page() -> None:
        try:
            if history:
                ws.send_binary(history)
            while True:
                chunk = console.recv(65536)
                if not chunk:
                    break
                ws.send_binary(chunk)
        except (OSError, WebSocketClosed):
            pass
        finally:
            ws.close(reason="the console ended")
            try:  # wakes the other direction's read
                ws.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    sender = threading.Thread(target=guest_to_page, name="pyvmm-ui-console", daemon=True)
    sender.start()
    try:
        while True:
            console.sendall(ws.receive())
    except (OSError, WebSocketClosed):
        pass
    finally:
        try:
            console.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sender.join(10)
        console.close()
        ws.close()
