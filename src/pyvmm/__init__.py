"""pyvmm: a virtual machine monitor in Python on Linux KVM."""

__version__ = "0.1.0"


def connect(config_dir=None, run_root=None):
    """The VMs of this user on this machine: a manage.client.Host (define, list, vm(name)...).
    Imported on first use, so `import pyvmm` stays cheap."""
    from .manage.client import connect as _connect

    return _connect(config_dir, run_root)
