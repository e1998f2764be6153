# vcpustate - sets distinctive general, x87, SSE, MXCSR, debug-register, CR8 and MSR state,
# signals a checkpoint, then checks that every value is still there. pyvmm ELF64 entry.
#
# Two checkpoints. At CPL0 the guest sets MSRs, debug registers, CR8 and general registers,
# writes checkpoint 1 and then checks them. It loads its own GDT (calibrate.S's) and IRETQs
# to CPL3, which sets x87/SSE/MXCSR and general registers (a KVM that emulates kernel code
# cannot run x87 instructions at CPL0; user code runs on the CPU), writes checkpoint 2 and
# checks them. The tests save the vCPU at each checkpoint and restore it into a fresh VM,
# where the guest goes on. Signals are 32-bit MMIO writes (they work at any CPL):
#   0xD0002000  the number of a check that failed
#   0xD0002004  checkpoint 1 or 2
#   0xD0002008  done
#   0xD000200C  TSC before the checkpoint, TSC after it (low, high halves)
# Interrupts stay off throughout.

        .set SIGNALS, 0xD0002000
        .set FAILED, SIGNALS
        .set CHECKPOINT, SIGNALS + 4
        .set DONE, SIGNALS + 8
        .set TSC_OUT, SIGNALS + 12
        .set KERNEL_CS, 0x08
        .set KERNEL_DS, 0x10
        .set USER_DS, 0x18 | 3
        .set USER_CS, 0x20 | 3

        .set LSTAR_VALUE, 0xffffffff89abcdef
        .set STAR_VALUE, 0x00100008cafe1234
        .set SFMASK_VALUE, 0x47700
        .set KERNEL_GS_VALUE, 0xffff888012345000
        .set CSTAR_VALUE, 0xffffffffcafe0000
        .set SYSENTER_ESP_VALUE, 0x7000
        .set SYSENTER_EIP_VALUE, 0x8000
        .set PAT_VALUE, 0x0007010600070106
        .set FS_BASE_VALUE, 0x5000
        .set GS_BASE_VALUE, 0x6000
        .set DR7_VALUE, 0x000d0400          # RW0/LEN0 set, no breakpoint enabled
        .set MXCSR_VALUE, 0x7f80            # round toward zero
        .set FCW_VALUE, 0x027f              # 53-bit precision

        .macro wrmsr64 index, value
        movl $\index, %ecx
        movabs $\value, %rax
        movq %rax, %rdx
        shrq $32, %rdx
        wrmsr
        .endm

        .macro fail id
        movl $\id, %eax
        movabs %eax, FAILED
        .endm

        .macro check_reg reg, value, id
        movabs $\value, %rax
        cmpq %rax, \reg
        je 1f
        fail \id
1:
        .endm

        .macro check_msr index, value, id
        movl $\index, %ecx
        rdmsr
        shlq $32, %rdx
        movl %eax, %eax
        orq %rdx, %rax
        movabs $\value, %rcx
        cmpq %rcx, %rax
        je 1f
        fail \id
1:
        .endm

        .macro check_msr_reg index, reg, id
        movl $\index, %ecx
        rdmsr
        shlq $32, %rdx
        movl %eax, %eax
        orq %rdx, %rax
        cmpq \reg, %rax
        je 1f
        fail \id
1:
        .endm

        .macro check_mem address, value, id
        movabs $\value, %rax
        cmpq %rax, \address(%rip)
        je 1f
        fail \id
1:
        .endm

        .data
        .p2align 4
xmm_a:  .quad 0x0123456789abcdef, 0xfedcba9876543210
xmm_b:  .quad 0x1111222233334444, 0x5555666677778888
xmm_out: .quad 0, 0
fp_out: .quad 0
fcw:    .word FCW_VALUE
fcw_out: .word 0
        .p2align 2
mxcsr:  .long MXCSR_VALUE
mxcsr_out: .long 0
tsc_before: .quad 0

        .bss
        .p2align 4
        .skip 4096
stack_top:

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
        wrmsr64 0xc0000082, LSTAR_VALUE
        wrmsr64 0xc0000081, STAR_VALUE
        wrmsr64 0xc0000084, SFMASK_VALUE
        wrmsr64 0xc0000102, KERNEL_GS_VALUE
        wrmsr64 0xc0000083, CSTAR_VALUE
        wrmsr64 0x174, 0x10
        wrmsr64 0x175, SYSENTER_ESP_VALUE
        wrmsr64 0x176, SYSENTER_EIP_VALUE
        wrmsr64 0x277, PAT_VALUE
        wrmsr64 0xc0000100, FS_BASE_VALUE
        wrmsr64 0xc0000101, GS_BASE_VALUE
        movabs $0x1000, %rax
        movq %rax, %db0
        movabs $0x2000, %rax
        movq %rax, %db1
        movabs $0x3000, %rax
        movq %rax, %db2
        movabs $0x4000, %rax
        movq %rax, %db3
        movabs $DR7_VALUE, %rax
        movq %rax, %db7
        movl $5, %eax
        movq %rax, %cr8
        movabs $0x0808080808080808, %r8
        movabs $0x0909090909090909, %r9
        movabs $0x1010101010101010, %r10
        movabs $0x1111111111111111, %r11
        movabs $0x1212121212121212, %r12
        movabs $0x1313131313131313, %r13
        movabs $0x1414141414141414, %r14
        movabs $0x1515151515151515, %r15
        movabs $0xb0b0b0b0b0b0b0b0, %rbx
        movabs $0xbebebebebebebebe, %rbp
        movabs $0x5151515151515151, %rsi
        movabs $0xd1d1d1d1d1d1d1d1, %rdi
        movl $1, %eax
        movabs %eax, CHECKPOINT
        jmp kernel_checks                   # ends the translation block: the software CPU stops here

kernel_checks:
        check_reg %r8, 0x0808080808080808, 101
        check_reg %r9, 0x0909090909090909, 102
        check_reg %r10, 0x1010101010101010, 103
        check_reg %r11, 0x1111111111111111, 104
        check_reg %r12, 0x1212121212121212, 105
        check_reg %r13, 0x1313131313131313, 106
        check_reg %r14, 0x1414141414141414, 107
        check_reg %r15, 0x1515151515151515, 108
        check_reg %rbx, 0xb0b0b0b0b0b0b0b0, 109
        check_reg %rbp, 0xbebebebebebebebe, 110
        check_reg %rsi, 0x5151515151515151, 111
        check_reg %rdi, 0xd1d1d1d1d1d1d1d1, 112
        check_msr 0xc0000082, LSTAR_VALUE, 20
        check_msr 0xc0000081, STAR_VALUE, 21
        check_msr 0xc0000084, SFMASK_VALUE, 22
        check_msr 0xc0000102, KERNEL_GS_VALUE, 23
        check_msr 0xc0000083, CSTAR_VALUE, 24
        check_msr 0x174, 0x10, 25
        check_msr 0x175, SYSENTER_ESP_VALUE, 26
        check_msr 0x176, SYSENTER_EIP_VALUE, 27
        check_msr 0x277, PAT_VALUE, 28
        check_msr 0xc0000100, FS_BASE_VALUE, 29
        check_msr 0xc0000101, GS_BASE_VALUE, 30
        movq %db0, %rbx
        check_reg %rbx, 0x1000, 40
        movq %db1, %rbx
        check_reg %rbx, 0x2000, 41
        movq %db2, %rbx
        check_reg %rbx, 0x3000, 42
        movq %db3, %rbx
        check_reg %rbx, 0x4000, 43
        movq %db7, %rbx
        andl $0xffff0fff, %ebx              # bits 12-15 read back as the CPU likes
        check_reg %rbx, DR7_VALUE, 44
        movq %cr8, %rbx
        check_reg %rbx, 5, 45
        pushq $USER_DS                  # IRETQ frame: SS, RSP, RFLAGS (IF = 0), CS, RIP
        leaq user_stack_top(%rip), %rax
        pushq %rax
        pushq $2
        pushq $USER_CS
        leaq user_entry(%rip), %rax
        pushq %rax
        iretq

user_entry:                             # CPL 3
        fninit
        fldcw fcw(%rip)
        fldpi
        fld1                                # st0 = 1.0, st1 = pi
        ldmxcsr mxcsr(%rip)
        movdqa xmm_a(%rip), %xmm0
        movdqa xmm_b(%rip), %xmm7
        movdqa xmm_a(%rip), %xmm15
        rdtsc
        movl %eax, tsc_before(%rip)
        movl %edx, tsc_before+4(%rip)
        movabs $0x0808080808080808, %r8
        movabs $0x0909090909090909, %r9
        movabs $0x1010101010101010, %r10
        movabs $0x1111111111111111, %r11
        movabs $0x1212121212121212, %r12
        movabs $0x1313131313131313, %r13
        movabs $0x1414141414141414, %r14
        movabs $0x1515151515151515, %r15
        movabs $0xb0b0b0b0b0b0b0b0, %rbx
        movabs $0xbebebebebebebebe, %rbp
        movabs $0x5151515151515151, %rsi
        movabs $0xd1d1d1d1d1d1d1d1, %rdi
        movl $2, %eax
        movabs %eax, CHECKPOINT
        jmp user_checks                     # ends the translation block: the software CPU stops here

user_checks:
        check_reg %r8, 0x0808080808080808, 1
        check_reg %r9, 0x0909090909090909, 2
        check_reg %r10, 0x1010101010101010, 3
        check_reg %r11, 0x1111111111111111, 4
        check_reg %r12, 0x1212121212121212, 5
        check_reg %r13, 0x1313131313131313, 6
        check_reg %r14, 0x1414141414141414, 7
        check_reg %r15, 0x1515151515151515, 8
        check_reg %rbx, 0xb0b0b0b0b0b0b0b0, 9
        check_reg %rbp, 0xbebebebebebebebe, 10
        check_reg %rsi, 0x5151515151515151, 11
        check_reg %rdi, 0xd1d1d1d1d1d1d1d1, 12
        fnstcw fcw_out(%rip)
        movzwl fcw_out(%rip), %ebx
        check_reg %rbx, FCW_VALUE, 50
        fstpl fp_out(%rip)
        check_mem fp_out, 0x3ff0000000000000, 51      # 1.0
        fstpl fp_out(%rip)
        check_mem fp_out, 0x400921fb54442d18, 52      # pi, rounded to a double
        stmxcsr mxcsr_out(%rip)
        movl mxcsr_out(%rip), %ebx
        check_reg %rbx, MXCSR_VALUE, 53
        movdqu %xmm0, xmm_out(%rip)
        check_mem xmm_out, 0x0123456789abcdef, 54
        check_mem xmm_out+8, 0xfedcba9876543210, 55
        movdqu %xmm7, xmm_out(%rip)
        check_mem xmm_out, 0x1111222233334444, 56
        check_mem xmm_out+8, 0x5555666677778888, 57
        movdqu %xmm15, xmm_out(%rip)
        check_mem xmm_out, 0x0123456789abcdef, 58
        check_mem xmm_out+8, 0xfedcba9876543210, 59
        rdtsc
        movl %eax, %ebx
        movl %edx, %ecx
        movl tsc_before(%rip), %eax
        movabs %eax, TSC_OUT
        movl tsc_before+4(%rip), %eax
        movabs %eax, TSC_OUT
        movl %ebx, %eax
        movabs %eax, TSC_OUT
        movl %ecx, %eax
        movabs %eax, TSC_OUT
        movabs %eax, DONE
1:      pause                               # (HLT would fault at CPL3)
        jmp 1b
