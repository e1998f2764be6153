"""The snapshot state reader (snapshot/state_file.py): what `pyvmm restore` and PUT /snapshot/load
read from a file a user hands in. Half the inputs are taken as a whole file (header, checksum and
all), the other half as the JSON payload put in a valid container (so the fuzzer gets past the
checksum and into every state's field checks). Anything wrong must be a StateError."""

from __future__ import annotations

import hashlib

from pyvmm.persist import StateError
from pyvmm.snapshot.state_file import FORMAT_VERSION, MAGIC, _HEADER, decode_snapshot


def one_input(data: bytes) -> None:
    if data[:1] == b"P" or not data:      # a whole file
        blob = data
    else:                                 # a payload in a well-formed container
        payload = data[1:]
        blob = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload
    try:
        decode_snapshot(blob, "fuzz.state")
    except StateError:
        pass
