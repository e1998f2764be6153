# cr4_reserved.S - setting a reserved CR4 bit, or one for a feature CPUID does not announce
# (LAM_SUP, bit 28, without CPUID.(7,1):EAX.LAM), raises #GP(0) (SDM vol. 3 2.5, MOV to CR).
# A kernel of its own: QEMU 7.2's TCG loops forever on such a MOV to CR4 (a QEMU bug).
        .include "common32.inc"
        .include "conform.inc"

        .text
        .globl main
main:
        call idt_install
        movl $0, %eax
        cpuid
        cmpl $7, %eax
        jb 3f
        movl $7, %eax
        movl $1, %ecx
        cpuid
        testl $(1 << 26), %eax          # CPUID.(7,1):EAX.LAM
        jz 3f
        SKIP cr4.lam_sup_unannounced_gp, "LAM announced"
        jmp 4f
3:      FAULT_RESUME_AT 1f
        movl %cr4, %eax
        orl $(1 << 28), %eax
        movl %eax, %cr4
1:      CHECK cr4.lam_sup_unannounced_gp, ev_log, $13
        movl %cr4, %eax
        andl $~(1 << 28), %eax
        movl %eax, %cr4
4:      FAULT_RESUME_AT 1f
        movl %cr4, %eax
        orl $(1 << 15), %eax            # always reserved
        movl %eax, %cr4
1:      CHECK cr4.reserved_bit15_gp, ev_log, $13
        movl %cr4, %eax
        andl $~(1 << 15), %eax
        movl %eax, %cr4
        FAULT_RESUME_AT 1f
        movl %cr4, %eax
        orl $(1 << 31), %eax            # reserved
        movl %eax, %cr4
1:      CHECK cr4.reserved_bit31_gp, ev_log, $13
        movl %cr4, %eax
        andl $~(1 << 31), %eax
        movl %eax, %cr4
        call done
