# assists - popcnt and verw at CPL0, the instructions pyvmm completes for a KVM that cannot
# emulate them (accel/kvm/assist.py); on any other CPU they simply run. pyvmm ELF64 entry
# (long mode, CPL0, interrupts off); not QEMU-bootable.
#
# The guest loads its own GDT, IDT (vectors 0-31) and page tables: 0-2 MiB one 2 MiB page,
# 2-4 MiB through a page table where 0x200000 is not present and 0x201000 is mapped.
# Each scenario reports four 32-bit OUTs to port 0x510: TAG, A[31:0], A[63:32], B:
#   TAG 1-15   a scenario that completed: A = its result register, B = RFLAGS & 0x8d5
#              (OF SF ZF AF PF CF) right after the instruction
#   TAG 0x80|V exception V raised by the scenario's instruction: A = CR2, B = error code,
#              followed by TAG 0xf0: A = saved RIP - the instruction's address, B = 0
#   TAG 0xff   done (then debug exit 0)
# Scenario numbers and their operands are listed at each one below.

        .set REPORT_PORT, 0x510
        .set DEBUG_EXIT_PORT, 0xf4
        .set ARITH_FLAGS, 0x8d5
        .set MSR_FS_BASE, 0xc0000100
        .set NP_PAGE, 0x200000
        .set PG_P, 1
        .set PG_RW, 2
        .set PG_PS, 0x80

        .bss
        .p2align 12
pml4:   .skip 4096
pdpt:   .skip 4096
pdir:   .skip 4096
ptab:   .skip 4096
idt:    .skip 32 * 16
        .p2align 4
        .skip 8192
stack_top:
        .p2align 3
fault_ip: .skip 8

        .data
        .p2align 3
gdt:    .quad 0
        .quad 0
        .quad 0x00AF9B000000FFFF        # 0x10 code, 64-bit, DPL0
        .quad 0x00CF93000000FFFF        # 0x18 data, read/write, DPL0
        .quad 0x00CF91000000FFFF        # 0x20 data, read-only, DPL0
        .quad 0x00CFF3000000FFFF        # 0x28 data, read/write, DPL3
gdt_end:
        .p2align 3
qword:  .quad 0x0123456789ABCDEF        # 32 bits set
table:  .long 0xFFFFFFFF, 0x80000001, 0x00000007, 0
selector: .word 0x18

        .section .rodata
        .p2align 3
gdtr:   .word gdt_end - gdt - 1
        .quad gdt
idtr:   .word 32 * 16 - 1
        .quad idt

        .macro VERW_REG tag, sel
        leaq 1f(%rip), %r15
        movl $\sel, %eax
        pushq $3
        popfq
        verw %ax
        movl $\tag, %edi
        movl $0, %eax                   # (not xor: keep the flags)
        call report_rax
1:
        .endm

        .text
        .code64
        .globl _start
_start:
        cli
        leaq stack_top(%rip), %rsp
        lgdt gdtr(%rip)
        # IDT: vector v -> stubs + 16 * v, 64-bit interrupt gates
        leaq stubs(%rip), %rax
        leaq idt(%rip), %rdi
        xorl %ecx, %ecx
1:      movq %rax, %rbx
        movw %bx, (%rdi)
        movw $0x10, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        shrq $16, %rbx
        movw %bx, 6(%rdi)
        shrq $16, %rbx
        movl %ebx, 8(%rdi)
        movl $0, 12(%rdi)
        addq $16, %rax
        addq $16, %rdi
        incl %ecx
        cmpl $32, %ecx
        jb 1b
        lidt idtr(%rip)
        # page tables
        leaq pdpt(%rip), %rax
        orq $(PG_P | PG_RW), %rax
        movq %rax, pml4(%rip)
        leaq pdir(%rip), %rax
        orq $(PG_P | PG_RW), %rax
        movq %rax, pdpt(%rip)
        movq $(PG_P | PG_RW | PG_PS), pdir(%rip)            # 0-2 MiB
        leaq ptab(%rip), %rax
        orq $(PG_P | PG_RW), %rax
        movq %rax, pdir+8(%rip)                             # 2-4 MiB: page table
        movq $(NP_PAGE + 0x1000 + PG_P + PG_RW), ptab+8(%rip)  # 0x201000 mapped, 0x200000 not
        leaq pml4(%rip), %rax
        movq %rax, %cr3

        # 1: popcnt %rbx, %rax; rbx = 0xf0f0f0f0f0f0f0f0, every arithmetic flag set before
        leaq 1f(%rip), %r15
        movabsq $0xF0F0F0F0F0F0F0F0, %rbx
        pushq $(ARITH_FLAGS | 2)
        popfq
        popcnt %rbx, %rax
        movl $1, %edi
        call report_rax
1:
        # 2: popcnt %ebx, %eax; ebx = 0 (rbx = 0xffffffff00000000), rax = -1 before
        leaq 1f(%rip), %r15
        movabsq $0xFFFFFFFF00000000, %rbx
        movq $-1, %rax
        pushq $2
        popfq
        popcnt %ebx, %eax
        movl $2, %edi
        call report_rax
1:
        # 3: popcnt %bx, %ax; bx = 0x8001, rax = 0x1111222233334444 before
        leaq 1f(%rip), %r15
        movq $0x8001, %rbx
        movabsq $0x1111222233334444, %rax
        popcnt %bx, %ax
        movl $3, %edi
        call report_rax
1:
        # 4: popcnt qword(%rip), %r9; the qword is 0x0123456789abcdef
        leaq 1f(%rip), %r15
        popcntq qword(%rip), %r9
        movq %r9, %rax
        movl $4, %edi
        call report_rax
1:
        # 5: popcnt 4(%rdi,%rcx,4), %r10d; rdi = table, rcx = 1: table[2] = 7
        leaq 1f(%rip), %r15
        leaq table(%rip), %rdi
        movl $1, %ecx
        popcntl 4(%rdi,%rcx,4), %r10d
        movq %r10, %rax
        movl $5, %edi
        call report_rax
1:
        # 6: popcnt %fs:4, %r11w; FS.base = table (0x80000001 -> 0x0001), r11 = -1 before
        leaq 1f(%rip), %r15
        movl $MSR_FS_BASE, %ecx
        leaq table(%rip), %rax
        movq %rax, %rdx
        shrq $32, %rdx
        wrmsr
        movq $-1, %r11
        popcntw %fs:4, %r11w
        movq %r11, %rax
        movl $6, %edi
        call report_rax
1:
        # 7: popcnt 0x10(%rbx), %rax with rbx = 0x200000: not present -> #PF(0), CR2 0x200010
        leaq 1f(%rip), %r15
        leaq 2f(%rip), %rax
        movq %rax, fault_ip(%rip)
        movq $NP_PAGE, %rbx
2:      popcntq 0x10(%rbx), %rax
        movl $7, %edi
        call report_rax
1:
        # 8: popcnt (%rbx) with rbx = 0x8000000000000000: non-canonical -> #GP(0)
        leaq 1f(%rip), %r15
        leaq 2f(%rip), %rax
        movq %rax, fault_ip(%rip)
        movabsq $0x8000000000000000, %rbx
2:      popcntq (%rbx), %rax
        movl $8, %edi
        call report_rax
1:
        # 9: popcnt 0x201ffc: a qword across the end of a mapped page into 0x202000 (not mapped)
        #    -> #PF(0) with CR2 = 0x202000
        leaq 1f(%rip), %r15
        leaq 2f(%rip), %rax
        movq %rax, fault_ip(%rip)
        movq $(NP_PAGE + 0x1ffc), %rbx
2:      popcntq (%rbx), %rax
        movl $9, %edi
        call report_rax
1:
        # 10-14: verw %ax with ax = 0x18 (rw data), 0x10 (code), 0x20 (read-only data),
        #        0x1b (RPL3 > DPL0), 0x2b (rw data DPL3, RPL3); CF set before (only ZF changes)
        VERW_REG 10, 0x18
        VERW_REG 11, 0x10
        VERW_REG 12, 0x20
        VERW_REG 13, 0x1b
        VERW_REG 14, 0x2b
        # 15: verw selector(%rip), the word 0x18
        leaq 1f(%rip), %r15
        pushq $2
        popfq
        verw selector(%rip)
        movl $15, %edi
        movl $0, %eax                   # (not xor: keep the flags)
        call report_rax
1:
        movl $0xff, %edi
        xorl %esi, %esi
        xorl %r8d, %r8d
        call report
        xorl %eax, %eax
        outl %eax, $DEBUG_EXIT_PORT
2:      cli
        hlt
        jmp 2b

# report_rax: TAG = edi, A = rax, B = the arithmetic flags as they are now.
report_rax:
        pushfq
        popq %r8
        andl $ARITH_FLAGS, %r8d
        movq %rax, %rsi
# report: TAG = edi, A = rsi, B = r8d; clobbers rax, rdx.
report:
        movw $REPORT_PORT, %dx
        movl %edi, %eax
        outl %eax, %dx
        movl %esi, %eax
        outl %eax, %dx
        movq %rsi, %rax
        shrq $32, %rax
        outl %eax, %dx
        movl %r8d, %eax
        outl %eax, %dx
        ret

# Exceptions: stub v pushes an error code of 0 when the CPU does not, then v.
        .p2align 4
stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .p2align 4
        .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        .else
        pushq $0
        .endif
        pushq $\v
        jmp exception
        .endr
exception:
        popq %rdi                       # vector
        popq %r8                        # error code
        popq %r9                        # saved RIP
        orl $0x80, %edi
        movq %cr2, %rsi
        call report
        movl $0xf0, %edi
        movq %r9, %rsi
        subq fault_ip(%rip), %rsi
        xorl %r8d, %r8d
        call report
        leaq stack_top(%rip), %rsp
        jmp *%r15
