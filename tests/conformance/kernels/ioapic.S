# ioapic.S - the I/O APIC (82093AA data sheet) driven by ISA lines the kernel controls: the
# test device's IRQ 5 (port 0x2005: non-zero raises the line, zero lowers it; pyvmm
# --test-devices, QEMU -device pc-testdev) and the PIT, whose IRQ 0 arrives at pin 2 (the
# interrupt source override every PC's MADT announces). Edge: one interrupt per rising edge,
# an edge while masked is lost. Level: one interrupt while asserted, Remote IRR set until the
# local APIC's EOI (broadcast for a TMR vector), re-sent at that EOI if still asserted; a pin
# asserted while masked is sent when unmasked. Redirection to vectors and destinations.
        .include "common32.inc"
        .include "conform.inc"

        .set IOAPIC, 0xfec00000
        .set IOWIN, 0x10
        .set TEST_IRQ, 5
        .set TEST_IRQ_PORT, 0x2000 + TEST_IRQ
        .set RTE_MASKED, 0x10000
        .set RTE_LEVEL, 0x8000
        .set RTE_REMOTE_IRR, 0x4000
        .set LAPIC_TMR, 0x180

        .macro RTE_SET pin, low
        movl $(0x10 + 2 * \pin + 1), %eax
        movl LAPIC + LAPIC_ID, %edx     # physical destination: this CPU's APIC ID
        call ioapic_write
        movl $(0x10 + 2 * \pin), %eax
        movl $(\low), %edx
        call ioapic_write
        .endm

        .macro LINE level
        movb $\level, %al
        movw $TEST_IRQ_PORT, %dx
        outb %al, %dx
        .endm

        .bss
remote_irr_1:   .long 0
tmr_bit:        .long 0

        .text
ioapic_read:                            # %eax = register -> %eax
        movl %eax, IOAPIC
        movl IOAPIC + IOWIN, %eax
        ret
ioapic_write:                           # %eax = register, %edx = value
        movl %eax, IOAPIC
        movl %edx, IOAPIC + IOWIN
        ret

spin:
1:      pause
        loop 1b
        ret

# remote_irr: %eax = Remote IRR of the test pin's entry (0 or 1)
remote_irr:
        movl $(0x10 + 2 * TEST_IRQ), %eax
        call ioapic_read
        shrl $14, %eax
        andl $1, %eax
        ret

        .globl main
main:
        call idt_install
        movb $0xff, %al                 # 8259 masked: the lines reach the IOAPIC alone
        outb %al, $0x21
        outb %al, $0xa1
        movl $1, eoi_vectors
        movl $0x1ff, LAPIC + LAPIC_SVR
        movl $0, LAPIC + LAPIC_TPR
        LINE 0

        # --- registers
        movl $1, %eax
        call ioapic_read
        shrl $16, %eax
        andl $0xff, %eax
        CHECK ioapic.max_redirection_entry, %eax, $23
        RTE_SET TEST_IRQ, RTE_MASKED | 0x61
        movl $(0x10 + 2 * TEST_IRQ), %eax
        call ioapic_read
        andl $0x1ffff, %eax
        CHECK ioapic.rte_read_back, %eax, $(RTE_MASKED | 0x61)

        # --- edge: one interrupt per rising edge, at the entry's vector
        call ev_reset
        sti
        RTE_SET TEST_IRQ, 0x61
        LINE 1
        movl $1, %ecx
        call wait_events
        LINE 1                          # still high: no edge
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK ioapic.edge_vector, ev_log, $0x61
        CHECK ioapic.edge_once_while_high, %ebx, $1
        LINE 0
        LINE 1
        movl $2, %ecx
        call wait_events
        LINE 0
        movl ev_count, %ebx
        CHECK ioapic.edge_each_rising_edge, %ebx, $2

        # --- edge while masked: lost, also after unmasking
        call ev_reset
        RTE_SET TEST_IRQ, RTE_MASKED | 0x61
        LINE 1
        LINE 0
        RTE_SET TEST_IRQ, 0x61
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK ioapic.edge_masked_lost, %ebx, $0
        cli

        # --- level: one interrupt while asserted; Remote IRR until EOI, re-sent at the EOI
        call ev_reset
        movl $0, eoi_vectors
        sti
        RTE_SET TEST_IRQ, RTE_LEVEL | 0x62
        LINE 1
        movl $1, %ecx
        call wait_events
        movl $200000, %ecx
        call spin
        call remote_irr
        movl %eax, remote_irr_1
        movl LAPIC + LAPIC_TMR + 0x30, %eax     # vector 0x62: TMR word 3, bit 2
        shrl $2, %eax
        andl $1, %eax
        movl %eax, tmr_bit
        movl ev_count, %ebx
        CHECK ioapic.level_vector, ev_log, $0x62
        CHECK ioapic.level_once_until_eoi, %ebx, $1
        CHECK ioapic.level_remote_irr_set, remote_irr_1, $1
        CHECK ioapic.level_lapic_tmr_set, tmr_bit, $1
        movl $0, LAPIC + LAPIC_EOI      # still asserted: sent again
        movl $2, %ecx
        call wait_events
        movl ev_count, %ebx
        CHECK ioapic.level_resent_at_eoi, %ebx, $2
        LINE 0
        movl $0, LAPIC + LAPIC_EOI      # deasserted: Remote IRR clears, nothing more
        movl $200000, %ecx
        call spin
        call remote_irr
        movl ev_count, %ebx
        CHECK ioapic.level_remote_irr_cleared, %eax, $0
        CHECK ioapic.level_quiet_after_deassert, %ebx, $2

        # --- level asserted while masked: sent once unmasked
        call ev_reset
        RTE_SET TEST_IRQ, RTE_MASKED | RTE_LEVEL | 0x63
        LINE 1
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK ioapic.level_masked_held, %ebx, $0
        RTE_SET TEST_IRQ, RTE_LEVEL | 0x63
        movl $1, %ecx
        call wait_events
        CHECK ioapic.level_sent_on_unmask, ev_log, $0x63
        LINE 0
        movl $0, LAPIC + LAPIC_EOI
        cli
        movl $1, eoi_vectors

        # --- a destination with no such APIC: nobody takes it
        call ev_reset
        sti
        movl $(0x10 + 2 * TEST_IRQ + 1), %eax
        movl $0x0f000000, %edx
        call ioapic_write
        movl $(0x10 + 2 * TEST_IRQ), %eax
        movl $0x64, %edx
        call ioapic_write
        LINE 1
        LINE 0
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK ioapic.other_destination_not_here, %ebx, $0
        RTE_SET TEST_IRQ, RTE_MASKED

        # --- the PIT's IRQ 0 arrives at pin 2 (source override), not at pin 0
        call ev_reset
        RTE_SET 0, 0x65
        RTE_SET 2, 0x66
        movb $0x30, %al                 # channel 0, lobyte/hibyte, mode 0 (one interrupt)
        outb %al, $0x43
        movw $1193, %ax                 # 1 ms
        outb %al, $0x40
        movb %ah, %al
        outb %al, $0x40
        movl $1, %ecx
        call wait_events
        movl $200000, %ecx
        call spin
        cli
        movl ev_count, %ebx
        CHECK ioapic.pit_at_pin2, ev_log, $0x66
        CHECK ioapic.pit_once, %ebx, $1
        RTE_SET 0, RTE_MASKED
        RTE_SET 2, RTE_MASKED
        call done
