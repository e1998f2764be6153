"""pyvmm: a virtual machine monitor in Python on Linux KVM.

    with pyvmm.Sandbox() as sb:          # a fresh guest from the warm snapshot (sandbox/)
        print(sb.run("uname -a").stdout)
"""

__version__ = "0.1.0"

from . import compiled as _compiled  # noqa: E402

_compiled.install()  # the mypyc build of the hot modules, if built for exactly this tree


def connect(config_dir=None, run_root=None):
    """The VMs of this user on this machine: a manage.client.Host (define, list, vm(name)...).
    Imported on first use, so `import pyvmm` stays cheap."""
    from .manage.client import connect as _connect

    return _connect(config_dir, run_root)


_SANDBOX_NAMES = ("Sandbox", "SandboxError", "SandboxTimeout", "RunResult")


def __getattr__(name: str):
    """pyvmm.Sandbox and its exceptions, imported on first use (`import pyvmm` stays cheap)."""
    if name in _SANDBOX_NAMES:
        from . import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
