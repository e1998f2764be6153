# strings64.S - REP string instructions that fault part way (SDM vol. 2 REP/MOVS/STOS/CMPS,
# vol. 3 6.15 #PF): the fault leaves RCX/RSI/RDI at the element that faulted, with the elements
# before it done, CR2 at the first byte not accessible; once the page is mapped the same
# instruction finishes. REP STOSD forwards, REPE CMPSB with the second operand in a missing page,
# REP MOVSB backwards (DF=1), REP STOSB into a read-only page (CR0.WP), a REP MOVSQ whose
# element straddles the boundary, and REP with RCX=0 touching nothing. (32-bit: paging.S.)
        .include "common32.inc"
        .include "conform64.inc"

        .set WINDOW, 0x40000000         # 4 KiB pages (page_table) at the start of GiB 1
        .set FRAMES, 0x600000
        .set P0, WINDOW
        .set P1, WINDOW + 0x1000
        .set P2, WINDOW + 0x2000        # not present until a check maps it
        .set P3, WINDOW + 0x3000
        .set P4, WINDOW + 0x4000        # read-only

        .bss
        .p2align 12
page_table: .skip 4096

        .text
        .code64
map_p2:
        movl $FRAMES + 0x2000 + 3, page_table + 2 * 8(%rip)
        invlpg P2
        ret
unmap_p2:
        movq $0, page_table + 2 * 8(%rip)
        invlpg P2
        ret

        .globl main64
main64:
        leaq page_table(%rip), %rdi
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        addl $FRAMES + 3, %eax
        movl %eax, (%rdi,%rcx,8)
        movl $0, 4(%rdi,%rcx,8)
        incl %ecx
        cmpl $8, %ecx
        jb 1b
        andq $~2, 4 * 8(%rdi)                       # P4 read-only
        leaq page_table + 3(%rip), %rax
        movq %rax, c64_pd + 4096(%rip)
        movq %cr3, %rax
        movq %rax, %cr3
        call unmap_p2
        movq %cr0, %rax
        orq $(1 << 16), %rax                        # WP: supervisor writes honour R/W
        movq %rax, %cr0
        cld

        # --- REP STOSD from 8 bytes before P2: two dwords stored, then #PF(W) at P2
        FAULT64 1f
        movl $P2 - 8, %edi
        movl $10, %ecx
        movl $0xAABBCCDD, %eax
        rep stosl
1:      CHECK64 strings64.stosd_faults, ev_vector(%rip), $14
        CHECK64 strings64.stosd_error, ev_error(%rip), $2
        movq %cr2, %rax
        CHECK64 strings64.stosd_cr2, %rax, $P2
        CHECK64 strings64.stosd_rcx_left, %rcx, $8
        CHECK64 strings64.stosd_rdi_at_fault, %rdi, $P2
        movl P2 - 4, %eax
        CHECK64 strings64.stosd_done_before, %rax, $0xAABBCCDD
        call map_p2
        movl $0xAABBCCDD, %eax
        rep stosl
        CHECK64 strings64.stosd_resumed_rcx, %rcx, $0
        movl P2 + 28, %eax
        CHECK64 strings64.stosd_resumed_last, %rax, $0xAABBCCDD
        call unmap_p2

        # --- REPE CMPSB: equal bytes up to P2, where the second operand is missing: #PF(read)
        movl $0x5A5A5A5A, P1 - 4
        movl $0x5A5A5A5A, P1
        movl $0x5A5A5A5A, P2 - 4
        movl $0x5A5A5A5A, FRAMES + 0x2000
        FAULT64 1f
        movl $P1 - 4, %esi
        movl $P2 - 4, %edi
        movl $8, %ecx
        repe cmpsb
1:      CHECK64 strings64.cmpsb_faults, ev_vector(%rip), $14
        CHECK64 strings64.cmpsb_error, ev_error(%rip), $0
        movq %cr2, %rax
        CHECK64 strings64.cmpsb_cr2, %rax, $P2
        CHECK64 strings64.cmpsb_rcx_left, %rcx, $4
        CHECK64 strings64.cmpsb_rsi_at_fault, %rsi, $P1
        CHECK64 strings64.cmpsb_rdi_at_fault, %rdi, $P2
        call map_p2
        repe cmpsb
        setz %al
        movzbq %al, %rax
        CHECK64 strings64.cmpsb_resumed_equal, %rax, $1
        CHECK64 strings64.cmpsb_resumed_rcx, %rcx, $0
        call unmap_p2

        # --- REP MOVSB backwards (DF=1) from P3+7 down into P2: 8 bytes, then #PF(W) at P3-1
        FAULT64 1f
        std
        movl $P0 + 0x100 + 31, %esi
        movl $P3 + 7, %edi
        movl $32, %ecx
        rep movsb
1:      cld
        CHECK64 strings64.movsb_down_faults, ev_vector(%rip), $14
        movq %cr2, %rax
        CHECK64 strings64.movsb_down_cr2, %rax, $(P3-1)
        CHECK64 strings64.movsb_down_rcx_left, %rcx, $24
        CHECK64 strings64.movsb_down_rdi, %rdi, $(P3-1)
        CHECK64 strings64.movsb_down_rsi, %rsi, $(P0+0x100+23)

        # --- REP STOSB into read-only P4 (CR0.WP=1): #PF(P|W) at P4, 3 bytes done
        FAULT64 1f
        movl $P4 - 3, %edi
        movl $8, %ecx
        movb $0x77, %al
        rep stosb
1:      CHECK64 strings64.stosb_ro_faults, ev_vector(%rip), $14
        CHECK64 strings64.stosb_ro_error, ev_error(%rip), $3
        CHECK64 strings64.stosb_ro_rcx_left, %rcx, $5
        CHECK64 strings64.stosb_ro_rdi, %rdi, $P4
        movzbl P4 - 1, %eax
        CHECK64 strings64.stosb_ro_done_before, %rax, $0x77

        # --- REP MOVSQ whose second element straddles P1/P2: that element faults, CR2 = P2
        FAULT64 1f
        movl $P0 + 0x200, %esi
        movl $P2 - 12, %edi
        movl $4, %ecx
        rep movsq
1:      CHECK64 strings64.movsq_straddle_faults, ev_vector(%rip), $14
        movq %cr2, %rax
        CHECK64 strings64.movsq_straddle_cr2, %rax, $P2
        CHECK64 strings64.movsq_straddle_rcx_left, %rcx, $3
        CHECK64 strings64.movsq_straddle_rdi, %rdi, $(P2-4)

        # --- RCX=0: nothing is touched (RDI in the missing page)
        call ev_reset64
        movl $P2, %edi
        xorl %ecx, %ecx
        rep stosb
        CHECK64 strings64.rcx0_no_fault, ev_count(%rip), $0
        CHECK64 strings64.rcx0_rdi_unchanged, %rdi, $P2
        ret
