"""TAPs handed to a VM process by its jailer, for its tap=auto NICs.

A jailed VM process cannot make a network namespace (`ip`, root): the jailer does, as root,
before the jail is built (HostNetwork: namespace, TAP, 10.0.2.1/24), and passes each TAP's open
descriptor through exec, named in $PYVMM_HANDED_TAPS as FD:TAP:NAMESPACE, comma-separated, in
the order of the definition's tap=auto NICs. The VM process then uses those: the k-th tap=auto
NIC of a machine gets a duplicate of the k-th TAP at each build (a reboot builds again), and
needs neither /dev/net/tun nor any helper program.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .netns import HostNetworkError
from .tap import Tap

ENV = "PYVMM_HANDED_TAPS"


@dataclass(frozen=True)
class HandedTap:
    fd: int
    name: str
    netns: str

    def encode(self) -> str:
        return f"{self.fd}:{self.name}:{self.netns}"


def encode(taps: list[HandedTap]) -> str:
    return ",".join(tap.encode() for tap in taps)


def handed_taps() -> list[HandedTap] | None:
    """The TAPs the jailer handed this process (None: not started by a jailer that made any)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    taps = []
    for item in text.split(","):
        fd, name, netns = item.split(":", 2)
        taps.append(HandedTap(int(fd), name, netns))
    return taps


class HandedNetwork:
    """The host side of one tap=auto NIC from a handed TAP: what HostNetwork is to the builder
    (.tap, .netns, close()), closing only its own duplicate (the jailer removes the namespace)."""

    def __init__(self, handed: HandedTap) -> None:
        self.netns = handed.netns
        self.tap: Tap | None = Tap(os.dup(handed.fd), handed.name, vnet_hdr=True)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None


def open_handed(auto_index: int | None) -> HandedNetwork | None:
    """The k-th handed TAP's network for the machine's k-th tap=auto NIC (`auto_index`); None
    when no TAP was handed (make one). A NIC the jailer made no TAP for is refused: a jailed
    process cannot make one."""
    taps = handed_taps()
    if taps is None:
        return None
    if auto_index is None or auto_index >= len(taps):
        raise HostNetworkError("a jailed VM gets its tap=auto TAPs from the jailer when it starts: a NIC added at "
                               "run time needs a TAP owned by the VM's uid (tap=NAME; ip tuntap add NAME mode tap "
                               "user UID)")
    return HandedNetwork(taps[auto_index])
