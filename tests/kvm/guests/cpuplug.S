# cpuplug - a guest that follows CPU hotplug of vCPU 1 through pyvmm's CPU hotplug controller
# (devices/legacy/cpu_hotplug.py), the way the ACPI methods of arch/x86_64/cpu_hotplug.py do,
# without ACPI (Multiboot ELF32; the VM has cpus=1, max_cpus=2).
#
# The BSP polls vCPU 1's events (SELECT 1, read EVENTS; a pause loop between polls):
#   plugged in:     "cpuplug: plug" and INIT, SIPI, SIPI to APIC ID 1 (vector 0x08, the
#                   trampoline copied to 0x8000, as in src/pyvmm/guests/smp.S);
#   asked to leave: "cpuplug: eject" and the eject (EJECT 1): the guest lets the CPU go
#                   WITHOUT stopping it first, so a vCPU that still ran after its unplug
#                   would keep counting.
# vCPU 1 counts STARTS once per start, then counts AP_COUNT for ever (pauses in between).
# The BSP counts its polls in BSP_COUNT. Fixed addresses, for the test to read:
#   0x300000 AP_COUNT   0x300004 STARTS   0x300008 BSP_COUNT   0x30000c AP_APIC_ID

        .include "common32.inc"

        .set CPU_HOTPLUG_PORT, 0x640
        .set REG_SELECT, 0
        .set REG_EVENTS, 8
        .set REG_EJECT, 12
        .set EVENT_INSERT, 1
        .set EVENT_REMOVE, 2
        .set AP_COUNT, 0x300000
        .set STARTS, 0x300004
        .set BSP_COUNT, 0x300008
        .set AP_APIC_ID, 0x30000c
        .set LAPIC_ID, 0xFEE00020
        .set LAPIC_ICR_LOW, 0xFEE00300
        .set LAPIC_ICR_HIGH, 0xFEE00310
        .set ICR_INIT, 0x00004500        # INIT, level assert, physical destination
        .set ICR_SIPI, 0x00004600        # | vector
        .set ICR_DELIVERY_PENDING, 0x1000
        .set TRAMP_BASE, 0x8000
        .set SIPI_VECTOR, TRAMP_BASE >> 12
        .set POLL_DELAY, 2000
        .set AP_DELAY, 200

        .text
        .code32
        .globl main
main:
        movl $msg_up, %esi
        call serial_puts
        movl $tramp_start, %esi
        movl $TRAMP_BASE, %edi
        movl $(tramp_end - tramp_start), %ecx
        rep movsb
.Lpoll:
        incl BSP_COUNT
        movl $POLL_DELAY, %ecx
1:      pause
        decl %ecx
        jnz 1b
        movw $(CPU_HOTPLUG_PORT + REG_SELECT), %dx
        movl $1, %eax
        outl %eax, %dx
        movw $(CPU_HOTPLUG_PORT + REG_EVENTS), %dx
        inl %dx, %eax
        testl $EVENT_INSERT, %eax
        jnz .Lplug
        testl $EVENT_REMOVE, %eax
        jnz .Leject
        jmp .Lpoll

.Lplug:
        movl $msg_plug, %esi
        call serial_puts
        movl $ICR_INIT, %eax
        call send_ipi
        movl $(ICR_SIPI | SIPI_VECTOR), %eax
        call send_ipi
        movl $(ICR_SIPI | SIPI_VECTOR), %eax
        call send_ipi
        jmp .Lpoll

.Leject:
        movl $msg_eject, %esi
        call serial_puts
        movw $(CPU_HOTPLUG_PORT + REG_EJECT), %dx   # vCPU 1 is still selected
        movl $1, %eax
        outl %eax, %dx
        jmp .Lpoll

# send_ipi: %eax to ICR low, destination APIC ID 1; wait (bounded) for delivery.
send_ipi:
        pushl %ecx
        movl $(1 << 24), LAPIC_ICR_HIGH
        movl %eax, LAPIC_ICR_LOW
        movl $1000, %ecx
1:      testl $ICR_DELIVERY_PENDING, LAPIC_ICR_LOW
        jz 2f
        pause
        decl %ecx
        jnz 1b
2:      popl %ecx
        ret

ap_entry32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl LAPIC_ID, %eax
        shrl $24, %eax
        movl %eax, AP_APIC_ID
        lock incl STARTS
.Lcount:
        lock incl AP_COUNT
        movl $AP_DELAY, %ecx
1:      pause
        decl %ecx
        jnz 1b
        jmp .Lcount

# The AP trampoline, run at TRAMP_BASE in real mode (CS = TRAMP_BASE >> 4, IP = 0).
        .p2align 4
tramp_start:
        .code16
        cli
        lgdtl %cs:(tramp_gdtr - tramp_start)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x08, $ap_entry32
        .p2align 3
tramp_gdt:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08: 32-bit code
        .quad 0x00CF93000000FFFF        # 0x10: data
tramp_gdt_end:
tramp_gdtr:
        .word tramp_gdt_end - tramp_gdt - 1
        .long TRAMP_BASE + (tramp_gdt - tramp_start)
tramp_end:
        .code32

        .section .rodata
msg_up:         .asciz "cpuplug: up\r\n"
msg_plug:       .asciz "cpuplug: plug\r\n"
msg_eject:      .asciz "cpuplug: eject\r\n"
