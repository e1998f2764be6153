# triple - triple-fault test guest (Multiboot ELF32).
#
# Prints "triple: faulting", loads an empty IDT (limit 0, base 0) and executes
# ud2.  Vector 6 (#UD) lies beyond the IDT limit -> #GP; vector 13 too -> #DF;
# vector 8 too -> triple fault, i.e. a shutdown the VMM must report (QEMU with
# -no-reboot exits with status 0).  ud2 rather than int3: a nested KVM that
# emulates CPL0 code may fail to emulate software interrupts (KVM internal
# error) before any fault is raised.  Should the CPU somehow carry on:
# cli; hlt forever.

        .include "common32.inc"

        .text
        .code32
        .globl main
main:
        movl $msg_faulting, %esi
        call serial_puts
        lidt null_idtr
        ud2
        jmp halt_forever

        .section .rodata
        .p2align 3
null_idtr:
        .word 0                         # limit 0: no vector is inside
        .long 0
msg_faulting:   .asciz "triple: faulting\r\n"
