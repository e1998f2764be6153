# msi - reports every interrupt vector it receives (tests of MSI delivery; Multiboot ELF32).
#
# Sets up an IDT whose vectors 32-255 each lead to a stub that writes its vector number
# (32-bit OUT) to port 0x510, sends the LAPIC an EOI and goes back to idling. Then
# software-enables the LAPIC (SVR = 0x1ff), writes 1 to port 0x514 ("ready") and idles in
# sti; hlt. Exceptions 0-31 have no handler: a fault triple-faults (the test sees a shutdown).

        .include "common32.inc"

        .set LAPIC_EOI, 0xfee000b0
        .set LAPIC_SVR, 0xfee000f0
        .set REPORT_PORT, 0x510
        .set READY_PORT, 0x514
        .set FIRST_VECTOR, 32
        .set STUB_SIZE, 16

        .text
        .code32
        .globl main
main:
        # IDT entries FIRST_VECTOR..255: 32-bit interrupt gates (0x8e00) to their stubs.
        movl $FIRST_VECTOR, %ecx
        movl $stubs, %eax
1:      movw %ax, idt(,%ecx,8)
        movw $0x08, idt+2(,%ecx,8)
        movw $0x8e00, idt+4(,%ecx,8)
        movl %eax, %edx
        shrl $16, %edx
        movw %dx, idt+6(,%ecx,8)
        addl $STUB_SIZE, %eax
        incl %ecx
        cmpl $256, %ecx
        jb 1b
        lidt idtr

        movl $0x1ff, LAPIC_SVR
        movl $1, %eax
        movw $READY_PORT, %dx
        outl %eax, %dx
        movl $idle_stack_top, %esp
idle:
        sti
        hlt
        jmp idle

# No iret: a nested KVM that emulates CPL0 code cannot emulate a protected-mode iret.
# The handler drops its frame and goes back to idling (IF is clear until the sti there).
interrupt:
        movl (%esp), %eax               # the stub's vector number
        movw $REPORT_PORT, %dx
        outl %eax, %dx
        movl $0, LAPIC_EOI
        movl $idle_stack_top, %esp
        jmp idle

        .p2align 4
stubs:
        .set vec, FIRST_VECTOR
        .rept 256 - FIRST_VECTOR
        .p2align 4
        pushl $vec
        jmp interrupt
        .set vec, vec + 1
        .endr

        .section .rodata
        .p2align 3
idtr:
        .word 256 * 8 - 1
        .long idt

        .bss
        .p2align 3
idt:
        .skip 256 * 8
        .p2align 4
        .skip 1024
idle_stack_top:
