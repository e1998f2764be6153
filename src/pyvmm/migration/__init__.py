"""Live migration: a running VM moved to another pyvmm over a stream socket (pre-copy).

`migrate(vm, "unix:PATH" | "tcp:HOST:PORT", MigrationOptions(...))` on the source,
`IncomingListener(address).receive(console_write)` on the destination. The protocol, the
order of events and who owns the VM when: channel.py, source.py, destination.py.
"""

from .channel import MigrationError, StreamError, parse_address
from .destination import Incoming, IncomingListener, receive
from .local import MigrationFigures, migrate_locally
from .source import Migration, MigrationCancelled, MigrationOptions, MigrationProgress, migrate

__all__ = ["Incoming", "IncomingListener", "Migration", "MigrationCancelled", "MigrationError", "MigrationFigures", "MigrationOptions",
           "MigrationProgress", "StreamError", "migrate", "migrate_locally", "parse_address", "receive"]
