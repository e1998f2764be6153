# exitbench - VM-exit cost benchmark guest (Multiboot ELF32).
#
# Command line (each optional, decimal, absent = 0):
#   pio=N    N x "outb %al, $0x80"   (port writes)
#   pior=N   N x "inb $0x80, %al"    (port reads: a full round trip)
#   mmio=M   M x 32-bit store to physical 0xD0000000 (unassigned in pyvmm and
#            QEMU; paging is off, so the address is used directly)
# Prints "exitbench: pio=N pior=N mmio=M" once, runs the loops in that order
# with nothing else inside them, then prints the TSC ticks each loop took
# (rdtsc right before and after it; 64-bit hex, 0 iterations still time the
# empty rdtsc pair) as
#   "exitbench: tsc pio=0x<16 hex> pior=0x<16 hex> mmio=0x<16 hex>"
# and debug-exits with value 0 (status 1).  The in-guest deltas let a
# benchmark exclude VMM start-up, firmware and this printing from its figures.

        .include "common32.inc"

        .set MMIO_TARGET, 0xD0000000

        .bss
        .p2align 2
count_pio:      .long 0
count_pior:     .long 0
count_mmio:     .long 0
        .p2align 3
tsc_pio:        .quad 0                 # TSC ticks of each loop (EDX:EAX deltas)
tsc_pior:       .quad 0
tsc_mmio:       .quad 0

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

        call tsc_start
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
        movl $tsc_pio, %edi
        call tsc_stop

        call tsc_start
        movl count_pior, %ecx
        testl %ecx, %ecx
        jz .Lpior_done
        .p2align 4
.Lpior_loop:
        inb $0x80, %al
        decl %ecx
        jnz .Lpior_loop
.Lpior_done:
        movl $tsc_pior, %edi
        call tsc_stop

        call tsc_start
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
        movl $tsc_mmio, %edi
        call tsc_stop

        movl $msg_tsc, %esi             # "exitbench: tsc pio="
        call serial_puts
        movl $tsc_pio, %edi
        call print_hex64
        movl $msg_pior, %esi
        call serial_puts
        movl $tsc_pior, %edi
        call print_hex64
        movl $msg_mmio, %esi
        call serial_puts
        movl $tsc_mmio, %edi
        call print_hex64
        call serial_newline

        xorl %eax, %eax
        call debug_exit
        jmp halt_forever

# tsc_start: remember the TSC in tsc_t0 (clobbers EAX, EDX).
tsc_start:
        rdtsc
        movl %eax, tsc_t0
        movl %edx, tsc_t0 + 4
        ret

# tsc_stop: store TSC - tsc_t0 as a u64 at (%edi) (clobbers EAX, EDX).
tsc_stop:
        rdtsc
        subl tsc_t0, %eax
        sbbl tsc_t0 + 4, %edx
        movl %eax, (%edi)
        movl %edx, 4(%edi)
        ret

# print_hex64: the u64 at (%edi) as "0x" and 16 hex digits.
print_hex64:
        pushal
        movb $'0', %al
        call serial_putc
        movb $'x', %al
        call serial_putc
        movl 4(%edi), %edx              # high half first
        call .Lhex32
        movl (%edi), %edx
        call .Lhex32
        popal
        ret
.Lhex32:                                # 8 digits of %edx (clobbers EAX, EBX, ECX, EDX)
        movl $8, %ecx
1:      roll $4, %edx
        movl %edx, %ebx
        andl $0xf, %ebx
        movb hexdigits(%ebx), %al
        call serial_putc
        decl %ecx
        jnz 1b
        ret

        .bss
        .p2align 3
tsc_t0:         .quad 0

        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
msg_tsc:        .asciz "exitbench: tsc pio="
key_pio:        .asciz "pio"
key_pior:       .asciz "pior"
key_mmio:       .asciz "mmio"
msg_head:       .asciz "exitbench: pio="
msg_pior:       .asciz " pior="
msg_mmio:       .asciz " mmio="
