"""Device models: pure state machines behind read(offset, size) / write(offset, data)."""
