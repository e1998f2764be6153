# roundtrip - counts in memory and through port I/O, checking itself at every step, until the
# count reaches the limit the host wrote; then debug exit 0 (status 1). A failed check is
# debug exit 2 (status 5). pyvmm ELF64 entry. Fixed addresses (u64, host-visible):
#   0x300000 COUNT   the count, also kept in %r12: they must agree at every step
#   0x300008 LIMIT   written by the host before the start
#   0x300010 STARTS  incremented at _start: a guest that restarted counts 2
# Each step also reads COM1's scratch register, which must hold the previous count's low
# byte, and writes the new one: the UART's state must go on as the count does.

        .set DEBUG_EXIT_PORT, 0xf4
        .set COM1_SCRATCH, 0x3ff
        .set COUNT, 0x300000
        .set LIMIT, 0x300008
        .set STARTS, 0x300010

        .bss
        .p2align 4
        .skip 4096
stack_top:

        .text
        .code64
        .globl _start
_start:
        cli
        leaq stack_top(%rip), %rsp
        incq STARTS
        xorl %r12d, %r12d
        movq %r12, COUNT
step:
        movq COUNT, %rax
        cmpq %rax, %r12                 # memory and register agree
        jne fail
        movw $COM1_SCRATCH, %dx
        inb %dx, %al
        cmpb %al, %r12b                 # the UART kept the previous count's low byte
        jne fail
        incq %r12
        movq %r12, COUNT
        movl %r12d, %eax
        outb %al, %dx
        cmpq LIMIT, %r12
        jb step
        xorl %eax, %eax
        outl %eax, $DEBUG_EXIT_PORT
        jmp halt
fail:
        movl $2, %eax
        outl %eax, $DEBUG_EXIT_PORT
halt:
        cli
        hlt
        jmp halt
