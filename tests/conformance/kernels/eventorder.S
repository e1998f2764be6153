# eventorder.S - event priorities and shadows (SDM vol. 3 6.8.3, 6.9, 6.12.1, 6.15, 10.6.1):
# the MOV SS shadow holds a single-step trap back for one instruction; an NMI in service blocks
# the next until IRET, and when IRET unblocks it with an external interrupt also pending, the
# NMI is taken first; a #NP while delivering a #PF is a #DF.
        .include "common32.inc"
        .include "conform.inc"

        .bss
db_count:       .long 0
db_eips:        .skip 8 * 4
nmi_seen_inside: .long 0

        .text
# gate_set: %eax = vector, %edx = handler: a DPL 0 interrupt gate in conf_idt.
gate_set:
        pushl %ebx
        movl %edx, %ebx
        andl $0xFFFF, %ebx
        orl $0x00080000, %ebx
        movl %ebx, conf_idt(,%eax,8)
        andl $0xFFFF0000, %edx
        orl $0x8E00, %edx
        movl %edx, conf_idt+4(,%eax,8)
        popl %ebx
        ret

# #DB: record the saved EIP (single-step traps), return.
db_handler:
        pushl %eax
        pushl %ebx
        movl db_count, %ebx
        cmpl $8, %ebx
        jae 1f
        movl 8(%esp), %eax
        movl %eax, db_eips(,%ebx,4)
1:      incl db_count
        popl %ebx
        popl %eax
        iret

# NMI: log vector 2 in ev_log; the first one sends another NMI and a fixed interrupt to this
# CPU, both of which must wait until its IRET.
nmi_handler:
        pushal
        movl ev_count, %ebx
        movl $2, ev_log(,%ebx,4)
        incl ev_count
        cmpl $1, ev_count
        jne 2f
        movl LAPIC + LAPIC_ID, %eax
        movl %eax, LAPIC + LAPIC_ICR_HI
        movl $0x400, LAPIC + LAPIC_ICR_LO            # NMI to our own APIC ID
        movl $0, LAPIC + LAPIC_ICR_HI
        movl $(0x40000 | 0x59), LAPIC + LAPIC_ICR_LO # fixed 0x59, shorthand self
        movl $100000, %ecx                           # time for either to (wrongly) arrive
1:      pause
        loop 1b
        movl ev_count, %eax
        movl %eax, nmi_seen_inside
2:      popal
        iret

        .globl main
main:
        call idt_install
        movl $1, eoi_vectors
        movl $0x1ff, LAPIC + LAPIC_SVR
        movl $0, LAPIC + LAPIC_TPR

        # --- single-step over MOV SS: the trap after it is held until after the next instruction
        movl $1, %eax
        movl $db_handler, %edx
        call gate_set
        movl $0, db_count
        pushfl
        orl $0x100, (%esp)
        popfl                           # TF=1: the first trap follows the next instruction
        movw %ss, %ax
1:      movw %ax, %ss                   # MOV SS: no trap after it
        nop
2:      pushfl
        andl $~0x100, (%esp)
        popfl
        CHECK shadow.movss_db_before, db_eips, $1b
        CHECK shadow.movss_db_after_next, db_eips+4, $2b

        # --- NMI in service: a second NMI and a fixed interrupt wait until its IRET; then the
        # NMI comes first (priority), the interrupt after the second NMI's IRET
        movl $2, %eax
        movl $nmi_handler, %edx
        call gate_set
        call ev_reset
        sti
        movl LAPIC + LAPIC_ID, %eax
        movl %eax, LAPIC + LAPIC_ICR_HI
        movl $0x400, LAPIC + LAPIC_ICR_LO
        movl $3, %ecx
        call wait_events
        cli
        CHECK priority.nmi_blocked_until_iret, nmi_seen_inside, $1
        CHECK priority.events, ev_count, $3
        CHECK priority.nmi_first, ev_log+4, $2
        CHECK priority.intr_after_nmi, ev_log+8, $0x59

        # --- #PF through a not-present gate: #NP while delivering #PF (page fault, then
        # contributory: SDM table 6-5) is a #DF with error code 0; CR2 has the #PF's address
        call paging_on
        call ev_reset
        andb $0x7f, conf_idt + 14 * 8 + 5
        xorl %eax, %eax
        movl %eax, %cr2
        movl $1f, resume_eip
        movl PF_PAGE, %eax
1:      orb $0x80, conf_idt + 14 * 8 + 5
        movl %cr2, %ebx
        CHECK df.pf_then_np_is_df, ev_log, $8
        CHECK df.pf_then_np_error, ev_error, $0
        CHECK df.pf_then_np_count, ev_count, $1
        CHECK df.pf_then_np_cr2, %ebx, $PF_PAGE
        call done

        .set PF_PAGE, 0x300000

# paging_on: 4 KiB pages identity-mapping the first 4 MiB, except PF_PAGE (not present);
# 4 MiB pages above (PSE) up to 4 GiB, for the LAPIC at 0xfee00000 too.
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
        orl $0x83, %eax
        movl %eax, page_directory(,%ecx,4)
        incl %ecx
        cmpl $1024, %ecx
        jb 2b
        movl %cr4, %eax
        orl $(1 << 4), %eax
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
