# counter - counts in memory for ever, checking the count against %r12 at every step; a
# mismatch (memory and registers not restored together) is debug exit 2 (status 5).
# pyvmm ELF64 entry. Fixed addresses (u64, host-visible):
#   0x300000 COUNT   the count, also kept in %r12
#   0x300010 STARTS  incremented at _start: a guest that restarted counts 2
# For tests that start it through an API (no chance to write a limit before it runs) and end
# it themselves.

        .set DEBUG_EXIT_PORT, 0xf4
        .set COUNT, 0x300000
        .set STARTS, 0x300010

        .text
        .code64
        .globl _start
_start:
        cli
        incq STARTS
        xorl %r12d, %r12d
        movq %r12, COUNT
step:
        movq COUNT, %rax
        cmpq %rax, %r12
        jne fail
        incq %r12
        movq %r12, COUNT
        jmp step
fail:
        movl $2, %eax
        outl %eax, $DEBUG_EXIT_PORT
halt:
        cli
        hlt
        jmp halt
