# cpuid - reports CPUID leaves to port 0x510, for the CPUID policy tests (pyvmm ELF64 entry).
#
# For each leaf in `leaves` (leaf, subleaf pairs) six 32-bit OUTs: leaf, subleaf, EAX, EBX,
# ECX, EDX as CPUID returned them at CPL0. Then debug exit 0.

        .set REPORT_PORT, 0x510
        .set DEBUG_EXIT_PORT, 0xf4

        .section .rodata
        .p2align 2
leaves: .long 0x40000000, 0
        .long 0x40000001, 0
        .long 1, 0
        .long 0xffffffff                # end

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
        leaq leaves(%rip), %rsi
1:      movl (%rsi), %eax
        cmpl $0xffffffff, %eax
        je 2f
        movl 4(%rsi), %ecx
        cpuid
        movl %eax, %r8d
        movl %edx, %r9d
        movw $REPORT_PORT, %dx
        movl (%rsi), %eax
        outl %eax, %dx
        movl 4(%rsi), %eax
        outl %eax, %dx
        movl %r8d, %eax
        outl %eax, %dx
        movl %ebx, %eax
        outl %eax, %dx
        movl %ecx, %eax
        outl %eax, %dx
        movl %r9d, %eax
        outl %eax, %dx
        addq $8, %rsi
        jmp 1b
2:      xorl %eax, %eax
        outl %eax, $DEBUG_EXIT_PORT
3:      cli
        hlt
        jmp 3b
