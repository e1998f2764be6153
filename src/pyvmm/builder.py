"""MachineConfig -> a ready-to-start Vm, as one flat recipe.

memory -> accelerator -> buses and devices -> kernel -> vCPUs. Each step either
succeeds or raises an error whose message is one line for the user; whatever
was created before the failure is released.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .arch.x86_64 import layout
from .arch.x86_64.cpuid import CpuidPolicy
from .bus import MmioBus, PioBus, Window
from .config import ConfigError, MachineConfig
from .arch.x86_64.acpi import build_acpi_tables, pci_root_acpi, pvpanic_device
from .arch.x86_64.numa import node_ranges, numa_tables
from .arch.x86_64.ged import ged_items
from .arch.x86_64.pci_hotplug import SCAN_METHOD as PCI_SCAN_METHOD, pci_hotplug_scope
from .arch.x86_64.cpu_hotplug import SCAN_METHOD as CPU_SCAN_METHOD, cpu_hotplug_container
from .arch.x86_64.vmgenid import write_generation_id
from .arch.x86_64.firmware import write_reset_vector
from .deadline_timer import DeadlineTimer
from .devices.legacy import AcpiPower, DebugExitPort, GuestNotify, I8042, Mc146818Rtc, Port80, PvPanic, Uart16550
from .devices.legacy.debug_exit import exit_status
from .devices.legacy.fw_cfg import FwCfg, FwCfgPorts, machine_items
from .devices.legacy.test_device import UNOFFERED_IRQS, TestDevice, TestDeviceIrqPorts
from .devices.legacy.ged import EVENT_CPU_HOTPLUG, EVENT_PCI_HOTPLUG, GenericEventDevice
from .devices.legacy.cpu_hotplug import CpuHotplugController
from .devices.legacy.pci_hotplug import PciHotplugController
from .devmgr import DeviceManager, DeviceTree, Request
from .loader import CpuMode, load_kernel
from .loader.entry import boot_state
from .memory import GuestMemory
from .outcome_sink import OutcomeSink
from .pci import PciRoot
from .iothread import IoThread
from .host.console_output import ConsoleOutput
from .virtio_wiring import VirtioWiring
from .vm import EXIT_GUEST_CRASH, EXIT_OK, EXIT_VMM_ERROR, Vm, VmOutcome

if TYPE_CHECKING:
    from .accel.base import Accelerator
    from .devices.virtio.host_side import StreamListener

log = logging.getLogger(__name__)

PCI_ROOT_ID = "pci"
PCI_HOTPLUG_ID = "pci-hotplug"
CPU_HOTPLUG_ID = "cpu-hotplug"
VSOCK_ID, RNG_ID = "virtio-vsock", "virtio-rng"   # one of each per VM
TEST_DEVICE_IDS = ("pc-testdev", "fw-cfg")   # MachineConfig.test_devices


def build_vm(config: MachineConfig, console_write: Callable[[bytes], None], *, accel=None,
             kernel_path: str | None = None, device_tree: DeviceTree | None = None) -> Vm:
    """Build a VM from `config`; guest console output goes to `console_write`.
    `accel`: an accelerator instance (default: the one auto picks). `device_tree`: a recorded
    tree (a snapshot's) whose allocation the devices get again."""
    with ExitStack() as cleanup:
        from .memory.backing import check_host

        check_host(config.backing(), config.memory)
        memory = GuestMemory.from_specs(layout.memory_specs(config.memory, config.virtio_mem_size), config.backing())
        memory.ram_size = config.memory  # not the virtio-mem region
        cleanup.callback(memory.close)
        machine = assemble(cleanup, config, console_write, memory, accel, device_tree)
        accel = machine.accel

        pci_items, ecam = pci_root_acpi(machine.pci_root)
        cpu_hotplug = config.max_cpus is not None
        events = ged_items(layout.GED_PORT, layout.GED_GSI, layout.VMGENID_ADDRESS,
                           calls=((EVENT_PCI_HOTPLUG, PCI_SCAN_METHOD),
                                  *([(EVENT_CPU_HOTPLUG, CPU_SCAN_METHOD)] if cpu_hotplug else [])))
        hotplug = pci_hotplug_scope(layout.PCI_HOTPLUG_PORT, layout.PCI_DEVICE_SLOTS)
        if cpu_hotplug:
            events.append(cpu_hotplug_container(layout.CPU_HOTPLUG_PORT, config.possible_cpus))
        rsdp = build_acpi_tables(memory, cpus=config.cpus, max_cpus=config.max_cpus, mcfg=ecam, cmos_rtc=True,
                                 devices=[pvpanic_device(layout.PVPANIC_PORT), *events,
                                          *pci_items, *machine.wiring.acpi_items, hotplug],
                                 extra_tables=numa_tables(config.numa, config.memory))
        write_generation_id(memory, layout.VMGENID_ADDRESS)
        write_reset_vector(memory)
        kernel = kernel_path or config.kernel
        if kernel is None:
            raise ConfigError("is needed: no kernel to boot", "kernel")
        entry = load_kernel(
            memory, kernel, cmdline=config.cmdline, modules=list(config.modules),
            flat_address=config.flat_address,
            flat_mode=CpuMode.LONG_64 if config.flat_64bit else CpuMode.PROTECTED_32,
            initrd=config.initrd, boot=config.boot, rsdp=rsdp, linux_cmdline=_linux_cmdline(config, accel),
        )
        log.info("loaded %s, entry %#x", entry.kind, entry.entry)

        vcpus = create_vcpus(accel, config)
        vcpus[0].set_state(boot_state(memory, entry))
        vm = machine.vm(vcpus)
        bind_numa(vm, config)
        cleanup.pop_all()
        return vm


def _linux_cmdline(config: MachineConfig, accel) -> str:
    """What a Linux guest needs on this machine: the accelerator's arguments, and, with virtio-mem,
    memory blocks onlined as the driver adds them (Debian's kernel leaves hotplugged memory
    offline by default, CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE unset)."""
    extra = " memhp_default_state=online" if config.virtio_mem_size and "memhp_default_state" not in config.cmdline \
        else ""
    return (accel.linux_cmdline + extra).strip()


def bind_numa(vm: Vm, config: MachineConfig) -> None:
    """Each guest node's RAM on its host node and its vCPU threads on that node's CPUs, where the
    host can (host/numa.py); else one line saying why not. A host node named and missing is a
    ConfigError."""
    if not config.numa:
        return
    from .host.numa import bind_memory, host_nodes, pin_thread, plan

    available = host_nodes()
    binding = plan([node.host_node for node in config.numa], available)
    if binding.host_nodes is None:
        log.warning("%s", binding.reason)
        return
    targets = binding.host_nodes
    for node, base, size in node_ranges(config.numa, config.memory):
        region = vm.memory.region_for(base, size)
        bind_memory(region.host_address + base - int(region.guest_base), size, targets[node])
    node_of = {cpu: index for index, node in enumerate(config.numa) for cpu in node.cpus}

    def pin(loop) -> None:
        nodes = sorted({targets[node_of[vcpu.index]] for vcpu in loop.vcpus})
        if len(nodes) > 1:
            log.info("%s runs vCPUs of several guest nodes: pinned to the CPUs of host nodes %s", loop.label, nodes)
        # 0: the calling thread, the only one seccomp's process filter lets a thread place
        pin_thread(0, tuple(sorted({cpu for node in nodes for cpu in available[node]})))

    vm.run_loop_hooks.append(pin)


def create_vcpus(accel, config: MachineConfig) -> list:
    policy = CpuidPolicy(set(config.cpu_hide))
    return [accel.create_vcpu(i, config.possible_cpus, policy) for i in range(config.cpus)]


@dataclass
class Machine:
    """A machine's parts before it has vCPUs: what build_vm and a restore share."""
    config: MachineConfig
    accel: Accelerator
    memory: GuestMemory
    pio: PioBus
    mmio: MmioBus
    manager: DeviceManager
    pci_root: PciRoot
    wiring: VirtioWiring
    iothread: IoThread
    transfers: Any   # host/disk_transfers.DiskTransfers, or None: disks serve every request in place
    rtc_timer: DeadlineTimer
    outcomes: OutcomeSink
    releases: list
    device_releases: dict[str, list]
    uart: Uart16550
    console_output: ConsoleOutput

    def _release(self) -> None:
        """Close what the devices opened on the host, hot-plugged ones included (in order)."""
        for release in list(self.releases):
            try:
                release()
            except Exception:  # one device failing to close must not leak the others
                log.warning("closing the VM: %s failed", getattr(release, "__qualname__", release), exc_info=True)

    def vm(self, vcpus: list) -> Vm:
        vm = Vm(self.accel, self.memory, self.pio, self.mmio, vcpus, self.manager.devices(), iothread=self.iothread,
                pausables=[self.rtc_timer, self.uart, self.console_output,
                           *([self.transfers] if self.transfers is not None else [])],
                on_close=[self.uart.flush_output, self.console_output.close, self.rtc_timer.close, self.wiring.close,
                          self._release, *([self.transfers.close] if self.transfers is not None else [])])
        vm.device_manager = self.manager
        vm.machine = self.config
        vm.assembly = self      # hotplug.py adds and removes devices through it
        self.outcomes.connect(vm.request_stop)
        return vm


def assemble(cleanup: ExitStack, config: MachineConfig, console_write: Callable[[bytes], None], memory: GuestMemory,
             accel=None, device_tree: DeviceTree | None = None, *, vsock_carried=None, lock_disks: bool = True) -> Machine:
    """The accelerator (mapping `memory`), the buses and every device of `config`, placed by the
    device manager (replaying `device_tree` when given), their host sides opened; what is made
    gets its release on `cleanup`. `vsock_carried`: a vsock host side carried over from a VM
    this one replaces (host/vsock.py). `lock_disks=False`: disk images opened unlocked
    (restore.prepare_vm)."""
    if accel is None:
        from .accel.select import choose_accelerator

        accel = choose_accelerator("auto").create()
    cleanup.callback(accel.close)
    accel.setup_platform()
    accel.map_memory(memory)

    pio, mmio = PioBus(), MmioBus()
    accel.connect_buses(pio, mmio)
    # Devices that can end the machine report to the sink; the Vm, built last, connects to it.
    outcomes = OutcomeSink()
    stop = outcomes.stop
    manager = DeviceManager(device_tree)

    def port_device(node_id: str, kind: str, device, ports: tuple[tuple[int, int], ...], gsis=(),
                    windows=None):
        """Allocate fixed ports (and IRQs) to `device` and put it on the port bus there;
        `windows`: (handler, bus name) for each port range when there are several."""
        node = manager.add(node_id, kind, Request(ports=ports, gsis=tuple(gsis)), transport="pio", device=device)
        for (base, length), (handler, name) in zip(node.resources.ports, windows or [(device, node_id)]):
            pio.register(base, length, handler, name)
        return node

    def reset() -> None:
        stop(VmOutcome("reset", EXIT_OK, "the guest reset the machine"))

    def poweroff() -> None:
        status = notify.command_status
        if status is None:
            stop(VmOutcome("poweroff", EXIT_OK, "the guest powered off"))
        else:
            stop(VmOutcome("poweroff", status, f"the guest's command exited with status {status}"))

    iothread = IoThread(on_error=lambda exc: stop(VmOutcome(
        "vmm-error", EXIT_VMM_ERROR, f"I/O thread: {type(exc).__name__}: {exc}")), yields=accel.io_thread_yields)
    cleanup.callback(iothread.stop)
    transfers = disk_transfers(iothread)
    if transfers is not None:
        cleanup.callback(transfers.close)  # (after the disks closed: callbacks run last first)
    # Console bytes reach the host in batches (host/console_output.py: why).
    console_output = ConsoleOutput(console_write, iothread)
    console_write = console_output.write
    uart = Uart16550(accel.irq_line(layout.COM1_IRQ), console_write, timers=iothread)
    port_device("com1", "uart16550", uart, ((layout.COM1_PORT, layout.COM1_PORT_COUNT),), (layout.COM1_IRQ,))
    i8042 = I8042(reset)
    port_device("i8042", "i8042", i8042, ((layout.I8042_DATA_PORT, 1), (layout.I8042_COMMAND_PORT, 1)),
                windows=[(i8042, "i8042-data"), (Window(i8042, layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT),
                                                "i8042-command")])
    debug_exit = DebugExitPort(lambda value: stop(VmOutcome(
        "debug-exit", exit_status(value), f"the guest wrote {value:#x} to the debug-exit port")))
    port_device("debug-exit", "debug-exit", debug_exit, ((layout.DEBUG_EXIT_PORT, layout.DEBUG_EXIT_PORT_COUNT),))
    port_device("post", "port80", Port80(), ((layout.POST_PORT, 1),))
    port_device("acpi-power", "acpi-power", AcpiPower(poweroff, reset, layout.ACPI_RESET_VALUE),
                ((layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_POWER_PORT_COUNT),))
    notify = GuestNotify()
    port_device("guest-notify", "guest-notify", notify, ((layout.GUEST_NOTIFY_PORT, layout.GUEST_NOTIFY_PORT_COUNT),))
    port_device("pvpanic", "pvpanic", PvPanic(lambda: stop(VmOutcome(
        "panic", EXIT_GUEST_CRASH, "the guest kernel panicked"))), ((layout.PVPANIC_PORT, 1),))
    # ACPI events (the power button) on a hardware-reduced platform: see arch/x86_64/ged.py.
    ged = GenericEventDevice(accel.irq_line(layout.GED_GSI))
    port_device("ged", "ged", ged, ((layout.GED_PORT, layout.GED_PORT_COUNT),), (layout.GED_GSI,))
    # PCI hotplug (hotplug.py): slots filled and emptied while the guest runs, through the GED.
    port_device(PCI_HOTPLUG_ID, "pci-hotplug", PciHotplugController(lambda: ged.raise_event(EVENT_PCI_HOTPLUG)),
                ((layout.PCI_HOTPLUG_PORT, layout.PCI_HOTPLUG_PORT_COUNT),))
    if config.max_cpus is not None:   # vCPUs plugged in and out (hotplug.set_vcpus)
        port_device(CPU_HOTPLUG_ID, "cpu-hotplug", CpuHotplugController(
            config.cpus, lambda: ged.raise_event(EVENT_CPU_HOTPLUG)), ((layout.CPU_HOTPLUG_PORT, layout.CPU_HOTPLUG_PORT_COUNT),))
    if config.test_devices:
        _add_test_devices(port_device, accel, config)

    # The RTC's update and alarm interrupts come due without the guest: a timer thread
    # calls it back on either accelerator.
    rtc_timer = DeadlineTimer(lambda: rtc.poll(), name="pyvmm-rtc", on_error=lambda exc: stop(VmOutcome(
        "vmm-error", EXIT_VMM_ERROR, f"RTC timer: {type(exc).__name__}: {exc}")))
    cleanup.callback(rtc_timer.close)
    rtc = Mc146818Rtc(accel.irq_line(layout.RTC_IRQ), timer=rtc_timer.arm)
    port_device("rtc", "mc146818-rtc", rtc, ((layout.RTC_PORT, layout.RTC_PORT_COUNT),), (layout.RTC_IRQ,))

    # The root complex registers conf1 and ECAM itself; the tree records them and its BAR windows.
    mmio64_window = layout.pci_mmio64_window(config.memory)
    manager.add(PCI_ROOT_ID, "pci-root", Request(
        ports=((layout.PCI_CONF1_PORT, layout.PCI_CONF1_PORT_COUNT), (layout.PCI_IO_START, layout.PCI_IO_SIZE)),
        mmio=((layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE), (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
              mmio64_window)), transport="platform")
    pci_root = PciRoot(pio, mmio, ecam_base=layout.PCI_ECAM_BASE,
                       mmio32_window=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
                       mmio64_window=mmio64_window,
                       io_window=(layout.PCI_IO_START, layout.PCI_IO_SIZE),
                       irq_line=accel.irq_line, msi_vector=accel.msi_vector)
    manager.attach(PCI_ROOT_ID, pci_root)
    wiring = VirtioWiring(accel, memory, mmio, iothread, manager, pci_root, PCI_ROOT_ID)
    cleanup.callback(wiring.close)
    releases: list = []
    cleanup.callback(lambda: [release() for release in reversed(releases)])
    device_releases: dict[str, list] = {}     # what each device opened: hotplug.py closes it on unplug
    for name, kind, device, transport in virtio_devices(config, console_write, iothread, releases, transfers,
                                                        vsock_carried=vsock_carried, lock_disks=lock_disks):
        device_releases[name] = releases[sum(map(len, device_releases.values())):]
        wiring.add(name, kind, device, transport)
    if manager.unclaimed():
        raise ConfigError(f": the recorded device tree has devices this machine lacks "
                          f"({', '.join(manager.unclaimed())})", "devices")
    return Machine(config, accel, memory, pio, mmio, manager, pci_root, wiring, iothread, transfers, rtc_timer, outcomes,
                   releases, device_releases, uart, console_output)


def disk_transfers(iothread):
    """The VM's threads for large disk transfers (host/disk_transfers.py), or None where the
    compiled group is not in use or PYVMM_DISK_THREADS=0."""
    from .host import disk_transfers as transfers

    if not transfers.available():
        return None
    return transfers.DiskTransfers(iothread)


def _add_test_devices(port_device, accel, config: MachineConfig) -> None:
    """QEMU's test-kernel devices (--test-devices): pc-testdev and fw_cfg (devices/legacy)."""
    irqs = [irq for irq in range(layout.TEST_DEVICE_IRQ_PORT_COUNT) if irq not in UNOFFERED_IRQS]
    device = TestDevice({irq: accel.irq_line(irq) for irq in irqs})
    port_device(TEST_DEVICE_IDS[0], "pc-testdev", device,
                ((layout.TEST_DEVICE_PORT, layout.TEST_DEVICE_PORT_COUNT),
                 (layout.TEST_DEVICE_IRQ_PORT, layout.TEST_DEVICE_IRQ_PORT_COUNT)),
                windows=[(device, "pc-testdev"), (TestDeviceIrqPorts(device), "pc-testdev-irq")])
    fw_cfg = FwCfgPorts(FwCfg(machine_items(config.memory, config.cpus, config.possible_cpus)))
    port_device(TEST_DEVICE_IDS[1], "fw-cfg", fw_cfg, ((layout.FW_CFG_PORT, layout.FW_CFG_PORT_COUNT),))


def virtio_devices(config: MachineConfig, console_write, iothread, releases: list, transfers=None, *,
                   vsock_carried=None, lock_disks: bool = True):
    """(id, kind, device, transport) for every virtio device the config asks for. Whatever a
    device opens on the host (image files, TAPs, sockets) gets its close() in `releases`."""
    if config.console == "virtio" or config.console_ports:
        from .devices.virtio.console import VirtioConsole
        from .host import UnixPortListener

        listeners: dict[str, StreamListener] = {}
        try:
            for port in config.console_ports:
                listeners[port.name] = UnixPortListener(port.socket, iothread)
        except BaseException:
            for listener in listeners.values():
                listener.close()
            raise
        console = VirtioConsole(console_write if config.console == "virtio" else _discard, ports=listeners)
        releases.append(console.close)
        yield "virtio-console", "virtio-console", console, config.console_transport
    for index, disk in enumerate(config.disks):
        device, kind = make_disk(disk, f"disks[{index}]", iothread, transfers, lock=lock_disks)
        releases.append(device.close)
        yield config.disk_id(index), kind, device, disk.transport
    for index, net in enumerate(config.nets):
        auto_index = sum(other.tap == "auto" for other in config.nets[:index])
        device, release = make_net(net, config.net_mac(index), iothread, auto_index)
        releases.append(release)
        yield config.net_id(index), "virtio-net", device, net.transport
    if config.vsock is not None:
        yield VSOCK_ID, "virtio-vsock", make_vsock(config.vsock, iothread, releases, vsock_carried), config.vsock.transport
    if config.rng is not None:
        from .devices.virtio.rng import VirtioRng

        yield RNG_ID, "virtio-rng", VirtioRng(), config.rng
    if config.balloon is not None:
        yield "virtio-balloon", "virtio-balloon", _balloon(config, iothread, releases), config.balloon.transport
    if config.virtio_mem_size:
        from .config import VIRTIO_MEM_BLOCK
        from .devices.virtio.mem import VirtioMem

        region = layout.virtio_mem_region(config.memory, config.virtio_mem_size)
        yield ("virtio-mem", "virtio-mem", VirtioMem(region.guest_base, region.size, VIRTIO_MEM_BLOCK),
               config.virtio_mem_transport)


def _balloon(config: MachineConfig, iothread, releases: list):
    """The balloon, its statistics timer calling back on the I/O thread (held while the VM is paused)."""
    from .devices.virtio.balloon import PAGE_SHIFT, VirtioBalloon

    settings = config.balloon
    assert settings is not None
    device: VirtioBalloon | None = None
    timer = DeadlineTimer(lambda: iothread.call_soon(device.poll_stats) if device is not None else None,
                          name="pyvmm-balloon")
    releases.append(timer.close)
    device = VirtioBalloon(target_pages=settings.amount_mib << (20 - PAGE_SHIFT), deflate_on_oom=settings.deflate_on_oom,
                           free_page_reporting=settings.free_page_reporting,
                           stats_interval_s=settings.stats_interval_s, timer=timer.arm)
    return device


def make_vsock(vsock, iothread, releases: list, carried=None):
    """The vsock device on its host side (Unix sockets at vsock.uds); their close()s go in `releases`."""
    from .devices.virtio.vsock import VirtioVsock
    from .host import VsockUnixHost

    host = VsockUnixHost(vsock.uds, iothread, carried=carried)
    releases.append(host.close)      # idempotent: the device closes it too
    device = VirtioVsock(vsock.cid, host)
    releases.append(device.close)
    return device


def make_disk(disk, field: str, iothread, transfers=None, *, lock: bool = True) -> tuple[Any, str]:
    """The device model of one disk and its kind; its image (or back-end) is open: close() it.
    `transfers`: the VM's disk transfer threads, if it has them."""
    if disk.vhost_user is not None:
        from .devices.virtio.vhost_user_blk import VhostUserBlk

        return VhostUserBlk(disk.vhost_user, iothread=iothread), "vhost-user-blk"
    from .devices.virtio.blk import BlockError, VirtioBlock

    assert disk.path is not None  # validate(): a path or a vhost-user socket
    try:
        return VirtioBlock(disk.path, readonly=disk.readonly, serial=disk.serial, rate_limit=disk.rate_limit,
                           timers=iothread, lock=lock, transfers=transfers), "virtio-blk"
    except BlockError as exc:
        raise ConfigError(f": {exc}", f"{field}.path") from None


def make_net(net, mac: str, iothread, auto_index: int | None = None):
    """The device model of one NIC, and what lets its host network (a TAP) go: the device's
    receive thread stops before the TAP closes (it must never read a reused fd number).
    `auto_index`: the NIC's place among the machine's tap=auto NICs (None: one plugged at run time)."""
    from .devices.virtio.net import VirtioNet

    backend = _open_net_backend(net, auto_index)
    try:
        device = VirtioNet(backend.tap, mac=bytes.fromhex(mac.replace(":", "")), iothread=iothread,
                           rx_rate_limit=net.rx_rate_limit, tx_rate_limit=net.tx_rate_limit)
    except BaseException:
        backend.close()
        raise

    def release() -> None:
        device.stop_io_threads()
        backend.close()
    return device, release


def _discard(data: bytes) -> None:
    pass


def _open_net_backend(net, auto_index: int | None):
    """The host side of one NIC: tap=auto is a new TAP in a new network namespace (in a jail,
    the one the jailer made: net/handed.py)."""
    from .net.handed import open_handed
    from .net.netns import HostNetwork

    if net.tap == "auto":
        return open_handed(auto_index) or HostNetwork().open()
    return HostNetwork(namespace=False, tap_name=net.tap).open()
