# syscall_entry - SYSCALL from CPL 3 into a CPL 0 handler that signals and halts. pyvmm ELF64
# entry; interrupts stay off. The test saves the vCPU in the handler: CS and SS hold what
# SYSCALL loads (selectors from STAR, flat, DPL 0, CS 64-bit).

        .set SIGNAL, 0xD0003000
        .set KERNEL_CS, 0x08
        .set KERNEL_DS, 0x10
        .set USER_DS, 0x18 | 3
        .set USER_CS, 0x20 | 3
        .set MSR_EFER, 0xC0000080
        .set MSR_STAR, 0xC0000081
        .set MSR_LSTAR, 0xC0000082

        .section .rodata
        .p2align 3
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF        # 0x08: code, L=1, DPL 0
        .quad 0x00CF93000000FFFF        # 0x10: data, DPL 0
        .quad 0x00CFF3000000FFFF        # 0x18: data, DPL 3
        .quad 0x00AFFB000000FFFF        # 0x20: code, L=1, DPL 3
gdt_end:
        .p2align 3
gdtr:
        .word gdt_end - gdt - 1
        .quad gdt

        .bss
        .p2align 4
        .skip 4096
stack_top:
        .skip 4096
user_stack_top:

        .text
        .code64
        .globl _start
_start:
        cli
        leaq stack_top(%rip), %rsp
        lgdt gdtr(%rip)
        pushq $KERNEL_CS
        leaq 1f(%rip), %rax
        pushq %rax
        lretq
1:      movw $KERNEL_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $MSR_EFER, %ecx
        rdmsr
        orl $1, %eax                    # SCE
        wrmsr
        movl $MSR_STAR, %ecx
        xorl %eax, %eax
        movl $0x00100008, %edx          # SYSCALL CS 0x08 (SS 0x10); SYSRET base 0x10
        wrmsr
        movl $MSR_LSTAR, %ecx
        leaq syscall_entry(%rip), %rax
        movq %rax, %rdx
        shrq $32, %rdx
        wrmsr
        pushq $USER_DS                  # IRETQ frame: SS, RSP, RFLAGS (IF = 0), CS, RIP
        leaq user_stack_top(%rip), %rax
        pushq %rax
        pushq $2
        pushq $USER_CS
        leaq user_entry(%rip), %rax
        pushq %rax
        iretq

user_entry:                             # CPL 3
        syscall
1:      jmp 1b

syscall_entry:                          # CPL 0
        movl $1, %eax
        movabs %eax, SIGNAL
1:      hlt
        jmp 1b
