"""pyvmm: a virtual machine monitor in Python on Linux KVM.

    with pyvmm.Sandbox() as sb:          # a fresh guest from the warm snapshot (sandbox/)
        print(sb.run("uname -a").stdout)
"""

__version__ = "0.1.0"

from . import compiled as _compiled  # noqa: E402

_compiled.install()  # the mypyc build of the hot modules, if built for exactly this tree

from . import start_up as _start_up  # noqa: E402

_start_up.cache_dataclass_code()  # pyvmm's dataclasses compiled once, kept in the user's cache


def connect(config_dir=None, run_root=None):
    """The VMs of this user on this machine: a manage.client.Host (define, list, vm(name)...).
    Imported on first use: `import pyvmm` does not load the client."""
    from .manage.client import connect as _connect

    return _connect(config_dir, run_root)


_SANDBOX_NAMES = ("Sandbox", "SandboxError", "SandboxTimeout", "RunResult")


def __getattr__(name: str):
    """pyvmm.Sandbox and its exceptions, imported on first use (`import pyvmm` does not load the sandbox)."""
    if name in _SANDBOX_NAMES:
        from . import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
