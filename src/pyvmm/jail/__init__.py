"""The jailer: a managed VM's process in namespaces, a private root, a control group, another
uid and Landlock (manage/jailer.py says how; exposure.py what it sees; docs/THREAT_MODEL.md why)."""

from .config import JailConfig, jail_options

__all__ = ["JailConfig", "jail_options"]
