# modes64.S - leaving and re-entering long mode (SDM vol. 3 9.8.5, 2.5, vol. 2 MOV CR / WRMSR):
# in 64-bit mode, clearing CR0.PG, clearing CR4.PAE and changing EFER.LME while paging is on are
# #GP(0); from compatibility mode, clearing CR0.PG leaves IA-32e mode (EFER.LMA=0, LME kept) and
# the code runs on as 32-bit protected mode without paging; setting CR0.PG again enters IA-32e
# mode (LMA=1) in compatibility mode, and a far jump to a 64-bit segment gets 64-bit mode back.
        .include "common32.inc"
        .include "conform64.inc"

        .set CR0_PG, 0x80000000
        .set CR4_PAE, 1 << 5
        .set EFER_LME, 1 << 8
        .set EFER_LMA, 1 << 10

        .bss
efer_in_long:      .quad 0
efer_paging_off:   .quad 0
cr0_paging_off:    .quad 0
efer_compat_again: .quad 0
cs_compat_again:   .quad 0
saved_rsp:         .quad 0
wide:              .quad 0

        .text
        .code64
        .globl main64
main64:
        movl $EFER_MSR, %ecx
        rdmsr
        andl $(EFER_LME | EFER_LMA), %eax
        CHECK64 modes.long_mode_lme_lma, %rax, $(EFER_LME | EFER_LMA)

        # --- to compatibility mode, paging off, paging on, back to 64-bit mode
        cli
        movq %rsp, saved_rsp(%rip)
        pushq $CODE32
        leaq compat(%rip), %rax
        pushq %rax
        lretq
        .code32
compat:
        movl %cr0, %eax
        andl $~CR0_PG, %eax
        movl %eax, %cr0                 # leaves IA-32e mode: LMA = 0
        movl $EFER_MSR, %ecx
        rdmsr
        movl %eax, efer_paging_off
        movl %cr0, %eax
        movl %eax, cr0_paging_off
        movl $0x89ABCDEF, wide + 4      # 32-bit code, flat, no paging
        movl %cr0, %eax
        orl $CR0_PG, %eax
        movl %eax, %cr0                 # IA-32e mode again, still compatibility mode
        movl $EFER_MSR, %ecx
        rdmsr
        movl %eax, efer_compat_again
        movw %cs, %ax
        movw %ax, cs_compat_again
        ljmp $CODE64, $back64
        .code64
back64:
        movw $DATA64, %ax
        movw %ax, %ds
        movw %ax, %ss
        movq saved_rsp(%rip), %rsp
        movq efer_paging_off(%rip), %rax
        andq $(EFER_LME | EFER_LMA), %rax
        CHECK64 modes.pg_off_clears_lma_keeps_lme, %rax, $EFER_LME
        movq cr0_paging_off(%rip), %rax
        shrq $31, %rax
        andq $1, %rax
        CHECK64 modes.pg_off_in_cr0, %rax, $0
        movq efer_compat_again(%rip), %rax
        andq $(EFER_LME | EFER_LMA), %rax
        CHECK64 modes.pg_on_sets_lma, %rax, $(EFER_LME | EFER_LMA)
        CHECK64 modes.compat_cs_after_pg_on, cs_compat_again(%rip), $CODE32
        movl $0x01234567, wide(%rip)
        movabsq $0x89ABCDEF01234567, %rax
        CHECK64 modes.back_in_64bit_mode, wide(%rip), %rax

        # --- what IA-32e mode refuses: #GP(0) (the crashing ones last: QEMU 7.2's TCG
        # accepts them)
        FAULT64 1f
        movl $EFER_MSR, %ecx
        rdmsr
        andl $~EFER_LME, %eax
        wrmsr
1:      CHECK64 modes.clear_lme_with_paging_gp, ev_vector(%rip), $13
        movl $EFER_MSR, %ecx            # (had the write succeeded)
        rdmsr
        orl $EFER_LME, %eax
        wrmsr
        movl $EFER_MSR, %ecx
        rdmsr
        andl $(EFER_LME | EFER_LMA), %eax
        CHECK64 modes.still_long_mode, %rax, $(EFER_LME | EFER_LMA)

        FAULT64 1f
        movq %cr0, %rax
        btrq $31, %rax                  # CR0.PG
        movq %rax, %cr0
1:      CHECK64 modes.clear_pg_in_64bit_gp, ev_vector(%rip), $13
        FAULT64 1f
        movq %cr4, %rax
        andq $~CR4_PAE, %rax
        movq %rax, %cr4
1:      CHECK64 modes.clear_pae_in_long_mode_gp, ev_vector(%rip), $13
        movq %cr4, %rax                 # (had the write succeeded)
        orq $CR4_PAE, %rax
        movq %rax, %cr4
        ret
