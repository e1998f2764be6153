# hello64 - smallest 64-bit guest for pyvmm's own ELF64 entry (not Multiboot,
# so QEMU cannot boot it).  Entered in long mode: CS = 0x10 (64-bit code),
# DS/ES/SS = 0x18, paging on with the low 4 GiB identity-mapped, interrupts off.
# Prints "Hello from 64-bit long mode" on COM1 and debug-exits with 0x2a
# (status 0x55); if that returns, cli; hlt forever.

        .set COM1, 0x3f8
        .set COM1_LSR, COM1 + 5
        .set LSR_THR_EMPTY, 0x20
        .set DEBUG_EXIT_PORT, 0xf4

        .bss
        .p2align 4
stack:
        .skip 4096
stack_top:

        .text
        .code64
        .globl _start
_start:
        cli
        cld
        leaq stack_top(%rip), %rsp      # do not depend on the VMM's stack
        leaq msg(%rip), %rsi
1:      lodsb
        testb %al, %al
        jz 3f
        movb %al, %cl
        movw $COM1_LSR, %dx
2:      inb %dx, %al                    # wait for the transmit register
        testb $LSR_THR_EMPTY, %al
        jz 2b
        movw $COM1, %dx
        movb %cl, %al
        outb %al, %dx
        jmp 1b
3:      movl $0x2a, %eax
        outl %eax, $DEBUG_EXIT_PORT
4:      cli
        hlt
        jmp 4b

        .section .rodata
msg:    .asciz "Hello from 64-bit long mode\r\n"
