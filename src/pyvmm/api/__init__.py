"""The per-VM API: Firecracker's REST resources plus pyvmm's, over HTTP on a Unix socket.

schema (the fields, validated one by one; VmSpec, the whole configuration), instance
(VmInstance: every operation on this process's VM, one lock serialising those that change
it), console (history and attachable terminals), server (HTTP routing, status codes),
openapi (the document served at /openapi.json). Imported only by managed VMs, never by
`pyvmm run`: a VM that nobody manages pays nothing for it.
"""
