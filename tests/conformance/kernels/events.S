# events.S - event delivery (SDM vol. 3 ch. 6): the order of a pending external interrupt and
# INT n, the STI shadow, self-IPI and self-NMI through the local APIC, #NP on a not-present
# gate, #NP during #NP delivery (#DF), #PF while reading the #NP gate (handled serially).
        .include "common32.inc"
        .include "conform.inc"

        .macro SELF_IPI vector
        movl $0, LAPIC + LAPIC_ICR_HI
        movl $(0x40000 | \vector), LAPIC + LAPIC_ICR_LO   # shorthand self, fixed
        .endm

        .text
        .globl main
main:
        call idt_install
        movl $1, eoi_vectors
        movl $0x1ff, LAPIC + LAPIC_SVR                    # software-enable, spurious 0xff
        movl $0, LAPIC + LAPIC_TPR

        # --- a self-IPI with IF=1 and an INT n right after it: both are taken.  (When the IPI
        # arrives relative to the next instructions is not architectural: the ICR write is
        # posted, SDM 10.6.1; QEMU takes the INT n first.)
        call ev_reset
        sti
        SELF_IPI 0x50
        int $0x51
        movl $2, %ecx
        call wait_events
        cli
        CHECK order.self_ipi_and_int_both_taken, ev_count, $2

        # --- pending with IF=0; STI's shadow covers the INT n after it, whose interrupt gate
        # clears IF: the external interrupt comes after the INT n handler returns
        call ev_reset
        SELF_IPI 0x52
        sti
        int $0x53
        nop
        nop
        cli
        CHECK order.sti_shadow_int.count, ev_count, $2
        CHECK order.sti_shadow_int.first, ev_log, $0x53
        CHECK order.sti_shadow_int.second, ev_log+4, $0x52

        # --- pending with IF=0; STI; NOP: taken after the NOP, before the INT n
        call ev_reset
        SELF_IPI 0x54
        sti
        nop
        int $0x55
        nop
        cli
        CHECK order.sti_nop_int.first, ev_log, $0x54
        CHECK order.sti_nop_int.second, ev_log+4, $0x55

        # --- pending with IF=0 stays pending while IF=0, with cli between
        call ev_reset
        SELF_IPI 0x56
        nop
        nop
        CHECK order.held_while_if0, ev_count, $0
        sti
        nop
        cli
        CHECK order.taken_after_sti, ev_log, $0x56

        # --- self-NMI: ICR with NMI delivery to our own APIC ID; taken even with IF=0
        call ev_reset
        movl LAPIC + LAPIC_ID, %eax
        movl %eax, LAPIC + LAPIC_ICR_HI               # destination: our APIC ID (bits 31:24)
        movl $0x400, LAPIC + LAPIC_ICR_LO             # delivery mode NMI, no shorthand
        movl $1, %ecx
        call wait_events
        CHECK nmi.self_nmi_delivered, ev_count, $1
        CHECK nmi.self_nmi_vector, ev_log, $2

        # --- INT n through a not-present gate: #NP, error code = vector*8+2 (IDT), EIP = the INT
        call ev_reset
        andb $0x7f, conf_idt + 0x60 * 8 + 5           # clear P of gate 0x60
        movl $1f, resume_eip
0:      int $0x60
1:      CHECK nested.np_vector, ev_log, $11
        CHECK nested.np_error, ev_error, $(0x60 * 8 + 2)
        CHECK nested.np_saved_eip, ev_eip, $0b

        # --- #NP while delivering #NP (contributory twice): #DF, error code 0
        call ev_reset
        andb $0x7f, conf_idt + 11 * 8 + 5             # clear P of the #NP gate too
        movl $1f, resume_eip
        int $0x60
1:      orb $0x80, conf_idt + 11 * 8 + 5
        CHECK nested.np_during_np_is_df, ev_log, $8
        CHECK nested.df_error, ev_error, $0
        CHECK nested.df_count, ev_count, $1

        # --- #PF while reading the #NP gate (#NP then #PF: handled serially, no #DF).  The
        # IDT is copied so that gates 0-11 lie in a not-present page and gates 12+ in the next.
        movl $conf_idt, %esi
        movl $PF_IDT, %edi
        movl $(256 * 2), %ecx
        rep movsl
        call paging_on
        lidt pf_idtr
        invlpg PF_PAGE
        call ev_reset
        movl %cr2, %eax
        xorl %eax, %eax
        movl %eax, %cr2
        movl $1f, resume_eip
        int $0x60
1:      lidt conf_idtr
        movl %cr2, %ebx
        CHECK nested.pf_during_np_vector, ev_log, $14
        CHECK nested.pf_during_np_count, ev_count, $1
        CHECK nested.pf_during_np_cr2, %ebx, $(PF_IDT + 11 * 8)
        CHECK nested.pf_during_np_error, ev_error, $0
        orb $0x80, conf_idt + 0x60 * 8 + 5
        call done

        .set PF_PAGE, 0x300000
        .set PF_IDT, PF_PAGE + 0x1000 - 96             # gate 12 starts the next page
        .section .rodata
pf_idtr:
        .word 256 * 8 - 1
        .long PF_IDT
        .text

# paging_on: 4 KiB pages identity-mapping the first 4 MiB, except PF_PAGE (not present);
# 4 MiB pages above (PSE) up to 1 GiB, for the LAPIC at 0xfee00000 too.
paging_on:
        pushal
        movl $page_table, %edi
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        orl $3, %eax
        movl %eax, (%edi,%ecx,4)
        incl %ecx
        cmpl $1024, %ecx
        jb 1b
        movl $0, page_table + (PF_PAGE >> 12) * 4
        movl $page_table, %eax
        orl $3, %eax
        movl %eax, page_directory
        movl $1, %ecx
2:      movl %ecx, %eax
        shll $22, %eax
        orl $0x83, %eax                 # present, writable, 4 MiB
        movl %eax, page_directory(,%ecx,4)
        incl %ecx
        cmpl $1024, %ecx
        jb 2b
        movl %cr4, %eax
        orl $(1 << 4), %eax             # PSE
        movl %eax, %cr4
        movl $page_directory, %eax
        movl %eax, %cr3
        movl %cr0, %eax
        orl $0x80000000, %eax
        movl %eax, %cr0
        popal
        ret

        .bss
        .p2align 12
page_directory:
        .skip 4096
page_table:
        .skip 4096
