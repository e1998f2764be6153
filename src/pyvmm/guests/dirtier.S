# dirtier - a guest that dirties memory as fast as it can, for benchmarks/dirty_tracking.py
# (Multiboot ELF32, so pyvmm and QEMU boot the same file).
#
# Command line: mib=<N> (default 64) MiB starting at 16 MiB are written, one 32-bit store
# every stride=<S> bytes (default 4096: one per page), pass after pass. The pass count is
# kept at PASSES (16 MiB - 4 KiB), where the host reads it to compute pages written per
# second. Prints "dirtier: running" once, then never exits.

        .include "common32.inc"

        .set AREA, 0x1000000
        .set PASSES, AREA - 0x1000

        .section .rodata
key_mib:    .asciz "mib"
key_stride: .asciz "stride"
msg_running: .asciz "dirtier: running"

        .text
        .code32
        .globl main
main:
        movl $64, %ebx                  # MiB
        movl $key_mib, %esi
        call cmdline_get_uint
        jc 1f
        movl %eax, %ebx
1:      movl $4096, %ebp                # stride
        movl $key_stride, %esi
        call cmdline_get_uint
        jc 2f
        testl %eax, %eax
        jz 2f
        movl %eax, %ebp
2:      shll $20, %ebx
        addl $AREA, %ebx                # end of the area
        movl $0, PASSES
        movl $msg_running, %esi
        call serial_puts
        call serial_newline
        xorl %ecx, %ecx                 # the pass number, stored everywhere
pass:
        incl %ecx
        movl $AREA, %edi
store:
        movl %ecx, (%edi)
        addl %ebp, %edi
        cmpl %ebx, %edi
        jb store
        movl %ecx, PASSES
        jmp pass
