"""Legacy PC devices as pure state machines behind read(offset, size) / write(offset, data).

Port ranges to register (offsets are relative to these bases):
    Uart16550   COM1 0x3f8, length 8 (IRQ 4)
    I8042       0x60 (data) and 0x64 (status/command, offset 4 of the device): two 1-port windows
    DebugExitPort 0xf4, length 4
    Port80      0x80, length 1
    AcpiPower   layout.ACPI_SLEEP_CONTROL_PORT, length 3
    GuestNotify layout.GUEST_NOTIFY_PORT, length 2
    PvPanic     0x505, length 1 (ACPI QEMU0001)
    Mc146818Rtc 0x70, length 2 (IRQ 8, ACPI PNP0B00)
    FwCfgPorts  0x510, length 2 (with --test-devices)
    TestDevice  0xe0, length 12; TestDeviceIrqPorts 0x2000, length 16 (with --test-devices)
"""

from .acpi_power import AcpiPower
from .debug_exit import DebugExitPort, exit_status
from .fw_cfg import FwCfg, FwCfgPorts
from .guest_notify import GuestNotify
from .i8042 import I8042
from .port80 import Port80
from .pvpanic import PvPanic
from .rtc import Mc146818Rtc
from .test_device import TestDevice, TestDeviceIrqPorts
from .uart16550 import Uart16550, UartStats

__all__ = ["AcpiPower", "DebugExitPort", "FwCfg", "FwCfgPorts", "GuestNotify", "I8042", "Mc146818Rtc", "Port80", "PvPanic", "TestDevice",
           "TestDeviceIrqPorts", "Uart16550", "UartStats", "exit_status"]
