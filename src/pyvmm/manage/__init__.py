"""Managed VMs: definitions, run records, starting VMs in the background, the client.

records (where definitions and runtime directories are; reading a VM's record), definitions
(TOML/JSON files checked by the API's schema), launch (a VM in a process of its own),
vmprocess (that process), client (pyvmm.connect(): VM handles for everything the CLI
does), clone, terminal (`pyvmm console`), cli (the virsh-style commands).
"""
