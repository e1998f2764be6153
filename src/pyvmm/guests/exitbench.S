# exitbench - VM-exit cost benchmark guest (Multiboot ELF32).
#
# Command line (each optional, decimal, absent = 0):
#   pio=N    N x "outb %al, $0x80"   (port writes)
#   pior=N   N x "inb $0x80, %al"    (port reads: a full round trip)
#   mmio=M   M x 32-bit store to physical 0xD0000000 (unassigned in pyvmm and
#            QEMU; paging is off, so the address is used directly)
# Prints "exitbench: pio=N pior=N mmio=M" once, runs the loops in that order
# with nothing else inside them, then debug-exits with value 0 (status 1).

        .include "common32.inc"

        .set MMIO_TARGET, 0xD0000000

        .bss
        .p2align 2
count_pio:      .long 0
count_pior:     .long 0
count_mmio:     .long 0

        .text
        .code32
        .globl main
main:
        movl $key_pio, %esi
        call cmdline_get_uint
        jc 1f
        movl %eax, count_pio
1:      movl $key_pior, %esi
        call cmdline_get_uint
        jc 2f
        movl %eax, count_pior
2:      movl $key_mmio, %esi
        call cmdline_get_uint
        jc 3f
        movl %eax, count_mmio
3:
        movl $msg_head, %esi            # "exitbench: pio="
        call serial_puts
        movl count_pio, %eax
        call print_dec
        movl $msg_pior, %esi
        call serial_puts
        movl count_pior, %eax
        call print_dec
        movl $msg_mmio, %esi
        call serial_puts
        movl count_mmio, %eax
        call print_dec
        call serial_newline

        movl count_pio, %ecx
        testl %ecx, %ecx
        jz .Lpio_done
        xorl %eax, %eax
        .p2align 4
.Lpio_loop:
        outb %al, $0x80
        decl %ecx
        jnz .Lpio_loop
.Lpio_done:
        movl count_pior, %ecx
        testl %ecx, %ecx
        jz .Lpior_done
        .p2align 4
.Lpior_loop:
        inb $0x80, %al
        decl %ecx
        jnz .Lpior_loop
.Lpior_done:
        movl count_mmio, %ecx
        testl %ecx, %ecx
        jz .Lmmio_done
        movl $MMIO_TARGET, %edi
        xorl %eax, %eax
        .p2align 4
.Lmmio_loop:
        movl %eax, (%edi)
        decl %ecx
        jnz .Lmmio_loop
.Lmmio_done:
        xorl %eax, %eax
        call debug_exit
        jmp halt_forever

        .section .rodata
key_pio:        .asciz "pio"
key_pior:       .asciz "pior"
key_mmio:       .asciz "mmio"
msg_head:       .asciz "exitbench: pio="
msg_pior:       .asciz " pior="
msg_mmio:       .asciz " mmio="
