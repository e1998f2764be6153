"""`pyvmm ui`: a web console for the VMs of this user, in the spirit of virt-manager.

A local HTTP server (server.py; the standard library's, with a small WebSocket of its own in
websocket.py) serves a few pages of plain HTML and JavaScript from static/ and a JSON API
(handlers.py) over the managed-VM client: the list of VMs with live graphs, one VM's charts,
devices, definition, snapshots and events, its serial console (console.py: the console page's
WebSocket joined to the VM's console socket), and a form to create VMs (forms.py: the API's
own checks, errors per field). It keeps no state of its own; stopping it touches no VM.

static/xterm.js and xterm.css are xterm.js 6.0.0 as published on the npm registry
(@xterm/xterm, lib/xterm.js and css/xterm.css, unchanged; MIT, static/xterm-license.txt),
committed so that installing pyvmm needs no build step and no page loads anything from
elsewhere. To update: `npm pack @xterm/xterm@VERSION` and copy the same two files.
"""
