# lapic64.S - CR8, the task-priority register of 64-bit mode (SDM vol. 3 10.8.6.1): CR8[3:0]
# is TPR[7:4] both ways, it holds back a vector whose class is not above it (in IRR) and lets
# a higher class through; lowering it delivers what waited; bits 63:4 are reserved (#GP).
        .include "common32.inc"
        .include "conform64.inc"

        .set LAPIC, 0xFEE00000
        .set LAPIC_TPR, 0x80
        .set LAPIC_EOI, 0xB0
        .set LAPIC_SVR, 0xF0
        .set LAPIC_IRR, 0x200
        .set LAPIC_ICR_LO, 0x300
        .set LAPIC_ICR_HI, 0x310

        .macro SELF_IPI vector
        movl $LAPIC, %edi
        movl $0, LAPIC_ICR_HI(%rdi)
        movl $LAPIC, %edi
        movl $(0x40000 | \vector), LAPIC_ICR_LO(%rdi)
        .endm

        .code64
        .text
spin64:
1:      pause
        loop 1b
        ret

# wait64: until ev_count >= %rcx, or ten million rounds
wait64:
        movl $10000000, %eax
1:      cmpq %rcx, ev_count(%rip)
        jae 2f
        pause
        decl %eax
        jnz 1b
2:      ret

        .globl main64
main64:
        movb $0xff, %al                 # 8259 masked: the firmware's PIT tick must not come in
        outb %al, $0x21
        outb %al, $0xa1
        movl $LAPIC, %edi
        movl $0x1ff, LAPIC_SVR(%rdi)

        movl $LAPIC, %edi
        movl $0x70, LAPIC_TPR(%rdi)
        movq %cr8, %rax
        CHECK64 cr8.reads_tpr_class, %rax, $7
        movq $5, %rax
        movq %rax, %cr8
        movl $LAPIC, %edi
        movl LAPIC_TPR(%rdi), %eax
        andl $0xf0, %eax
        CHECK64 cr8.writes_tpr, %rax, $0x50

        call ev_reset64
        sti
        SELF_IPI 0x45
        movl $200000, %ecx
        call spin64
        movq ev_count(%rip), %rbx
        CHECK64 cr8.holds_lower_class, %rbx, $0
        movl $LAPIC, %edi
        movl LAPIC_IRR+0x20(%rdi), %eax     # vector 0x45: IRR word 2, bit 5
        shrl $5, %eax
        andl $1, %eax
        CHECK64 cr8.held_vector_in_irr, %rax, $1
        SELF_IPI 0x65
        movl $1, %ecx
        call wait64
        CHECK64 cr8.passes_higher_class, ev_vector(%rip), $0x65
        movl $LAPIC, %edi
        movl $0, LAPIC_EOI(%rdi)
        xorl %eax, %eax
        movq %rax, %cr8
        movl $2, %ecx
        call wait64
        CHECK64 cr8.lowered_delivers, ev_vector(%rip), $0x45
        movl $LAPIC, %edi
        movl $0, LAPIC_EOI(%rdi)
        cli

        FAULT64 1f
        movq $0x10, %rax
        movq %rax, %cr8
1:      CHECK64 cr8.reserved_bits_gp, ev_vector(%rip), $13
        call done64
