"""Checked by mypy (scripts/check), never run: each implementation meets its seam's Protocol.

Protocols are structural, so nothing else makes mypy compare a class with the protocol it is
meant to implement until some code happens to pass one where the other is expected. Each
function below does that once per implementation: a missing method, a wrong signature or a
narrower attribute type is a type error here.
"""

from __future__ import annotations

from pyvmm.accel.base import Accelerator, Vcpu, VmServices
from pyvmm.accel.kvm.accelerator import KvmAccelerator, KvmIrqLine
from pyvmm.accel.kvm.calibration import _CalibrationRun
from pyvmm.accel.kvm.interrupts import KvmMsiVector
from pyvmm.accel.kvm.state import KvmVmState
from pyvmm.accel.kvm.vcpu import KvmVcpu
from pyvmm.accel.tcg.accelerator import TcgAccelerator
from pyvmm.accel.tcg.vcpu import TcgVcpu
from pyvmm.arch.x86_64.cpu_state import VcpuState
from pyvmm.bus.bus import BusDevice
from pyvmm.bus.interrupt import IrqLine, MsiVector, NullIrqLine, NullMsiVector
from pyvmm.devices.legacy.acpi_power import AcpiPower, AcpiPowerState
from pyvmm.devices.legacy.debug_exit import DebugExitPort, DebugExitState
from pyvmm.devices.legacy.guest_notify import GuestNotify, GuestNotifyState
from pyvmm.devices.legacy.i8042 import I8042, I8042State
from pyvmm.devices.legacy.port80 import Port80, Port80State
from pyvmm.devices.legacy.pvpanic import PvPanic, PvPanicState
from pyvmm.devices.legacy.rtc import Mc146818Rtc, RtcState
from pyvmm.devices.legacy.uart16550 import Uart16550
from pyvmm.devices.legacy.uart16550_state import UartState
from pyvmm.devices.virtio.blk import BlockState, VirtioBlock
from pyvmm.devices.virtio.console import ConsoleState, VirtioConsole
from pyvmm.devices.virtio.mmio import MmioTransportState, VirtioMmioTransport
from pyvmm.devices.virtio.net import NetState, VirtioNet
from pyvmm.devices.virtio.pci import VirtioPciState, VirtioPciTransport
from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.devices.virtio.queue_state import SplitQueueState
from pyvmm.devices.virtio.rng import RngState, VirtioRng
from pyvmm.devices.virtio.vhost_user_blk import VhostUserBlk, VhostUserBlkState
from pyvmm.devices.virtio.vsock import VirtioVsock, VsockState
from pyvmm.devmgr.tree import DeviceTree, DeviceTreeState
from pyvmm.pci.config import PciConfigSpace, PciConfigState
from pyvmm.pci.msix import MsixCapability
from pyvmm.pci.msix_state import MsixState
from pyvmm.pci.root import PciRoot, PciRootState
from pyvmm.persist import Persist
from pyvmm.platform.clock import VirtualClock
from pyvmm.platform.clock_state import ClockState
from pyvmm.platform.ioapic import IoApic
from pyvmm.platform.ioapic_state import IoApicState
from pyvmm.platform.lapic_persist import LapicPersist
from pyvmm.platform.lapic_state import LapicState
from pyvmm.platform.machine import SoftwarePlatform
from pyvmm.platform.machine_state import SoftwarePlatformState
from pyvmm.platform.msi import SoftwareMsiVector
from pyvmm.platform.pic import Pic8259Pair
from pyvmm.platform.pic_state import PicPairState
from pyvmm.platform.pit import Pit8254
from pyvmm.platform.pit_state import PitState
from pyvmm.vm import Vm


def accelerators(kvm: KvmAccelerator, tcg: TcgAccelerator) -> list[Accelerator]:
    return [kvm, tcg]


def vcpus(kvm: KvmVcpu, tcg: TcgVcpu) -> list[Vcpu]:
    return [kvm, tcg]


def vm_services(vm: Vm, calibration: _CalibrationRun) -> list[VmServices]:
    return [vm, calibration]


def interrupts(kvm_line: KvmIrqLine, null_line: NullIrqLine, kvm_msi: KvmMsiVector, software_msi: SoftwareMsiVector,
               null_msi: NullMsiVector) -> tuple[list[IrqLine], list[MsiVector]]:
    return [kvm_line, null_line], [kvm_msi, software_msi, null_msi]


def bus_devices(uart: Uart16550, rtc: Mc146818Rtc, i8042: I8042, port80: Port80, pvpanic: PvPanic,
                acpi_power: AcpiPower, debug_exit: DebugExitPort, notify: GuestNotify,
                mmio: VirtioMmioTransport) -> list[BusDevice]:
    return [uart, rtc, i8042, port80, pvpanic, acpi_power, debug_exit, notify, mmio]


def persist_vcpus(kvm: KvmVcpu, tcg: TcgVcpu) -> list[Persist[VcpuState]]:
    return [kvm, tcg]


def persist_machine(kvm: KvmAccelerator, platform: SoftwarePlatform, clock: VirtualClock, pic: Pic8259Pair,
                    pit: Pit8254, ioapic: IoApic, lapic: LapicPersist, tree: DeviceTree) -> None:
    _kvm: Persist[KvmVmState] = kvm
    _platform: Persist[SoftwarePlatformState] = platform
    _clock: Persist[ClockState] = clock
    _pic: Persist[PicPairState] = pic
    _pit: Persist[PitState] = pit
    _ioapic: Persist[IoApicState] = ioapic
    _lapic: Persist[LapicState] = lapic
    _tree: Persist[DeviceTreeState] = tree


def persist_legacy_devices(uart: Uart16550, rtc: Mc146818Rtc, i8042: I8042, port80: Port80, pvpanic: PvPanic,
                           acpi_power: AcpiPower, debug_exit: DebugExitPort, notify: GuestNotify) -> None:
    _uart: Persist[UartState] = uart
    _rtc: Persist[RtcState] = rtc
    _i8042: Persist[I8042State] = i8042
    _port80: Persist[Port80State] = port80
    _pvpanic: Persist[PvPanicState] = pvpanic
    _acpi_power: Persist[AcpiPowerState] = acpi_power
    _debug_exit: Persist[DebugExitState] = debug_exit
    _notify: Persist[GuestNotifyState] = notify


def persist_virtio(blk: VirtioBlock, console: VirtioConsole, net: VirtioNet, rng: VirtioRng, vsock: VirtioVsock,
                   vhost_blk: VhostUserBlk, queue: SplitQueue, mmio: VirtioMmioTransport,
                   pci: VirtioPciTransport) -> None:
    _blk: Persist[BlockState] = blk
    _console: Persist[ConsoleState] = console
    _net: Persist[NetState] = net
    _rng: Persist[RngState] = rng
    _vsock: Persist[VsockState] = vsock
    _vhost_blk: Persist[VhostUserBlkState] = vhost_blk
    _queue: Persist[SplitQueueState] = queue
    _mmio: Persist[MmioTransportState] = mmio
    _pci: Persist[VirtioPciState] = pci


def persist_pci(config: PciConfigSpace, msix: MsixCapability, root: PciRoot) -> None:
    _config: Persist[PciConfigState] = config
    _msix: Persist[MsixState] = msix
    _root: Persist[PciRootState] = root
