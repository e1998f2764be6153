# ticker - counts ticks in memory and in %r13, checking they agree at every tick, and prints
# each on COM1 as "tick XXXXXXXXXXXXXXXX\n" (16 hex digits): a console that shows every tick
# once, in order, across a migration proves that nothing was lost or replayed. A failed
# check prints "BROKEN\n" and ends with debug exit 2 (status 5). pyvmm ELF64 entry.
#   0x300000 TICKS   the tick count, also kept in %r13
#   0x300008 SPIN    iterations between ticks (0: the default, 5000000)

        .set DEBUG_EXIT_PORT, 0xf4
        .set COM1, 0x3f8
        .set TICKS, 0x300000
        .set SPIN, 0x300008

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
        xorl %r13d, %r13d
        movq %r13, TICKS
tick:
        movq SPIN, %rcx
        testq %rcx, %rcx
        jnz spin
        movq $5000000, %rcx
spin:
        decq %rcx
        jnz spin
        movq TICKS, %rax
        cmpq %rax, %r13
        jne fail
        incq %r13
        movq %r13, TICKS
        leaq tick_text(%rip), %rsi
        call puts
        movq %r13, %rax
        movl $16, %ecx
digit:
        rolq $4, %rax
        movl %eax, %ebx
        andl $15, %ebx
        leaq hex(%rip), %rsi
        movb (%rsi,%rbx), %bl
        pushq %rax
        movb %bl, %al
        movw $COM1, %dx
        outb %al, %dx
        popq %rax
        decl %ecx
        jnz digit
        movb $10, %al
        movw $COM1, %dx
        outb %al, %dx
        jmp tick
fail:
        leaq broken_text(%rip), %rsi
        call puts
        movl $2, %eax
        outl %eax, $DEBUG_EXIT_PORT
halt:
        cli
        hlt
        jmp halt

# puts: the NUL-terminated string at %rsi to COM1
puts:
        movw $COM1, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      ret

        .section .rodata
tick_text:   .asciz "tick "
broken_text: .asciz "BROKEN\n"
hex:         .ascii "0123456789abcdef"
