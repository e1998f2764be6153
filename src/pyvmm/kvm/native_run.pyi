# native_run.c: KVM_RUN with the GIL released, and the vCPU's hot loop (built by scripts/compile).
from typing import Any, Callable

KVM_RUN: int
KVM_RUN_EXIT_OFFSET: int

class RunFailed(OSError): ...

def ioctl(fd: int, request: int, arg: int) -> int: ...
def serve_io_exits(ioctl: Callable[[int, int, int], int], fd: int, counts: list[int], page: Any,
                   pio: Any, mmio: Any) -> int: ...
