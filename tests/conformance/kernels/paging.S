# paging.S - 32-bit paging (SDM vol. 3 4.3, 4.7, 4.8): accessed and dirty bits of 4 KiB and
# 4 MiB pages, CR0.WP, #PF error codes, and a REP MOVSB that runs into a not-present page
# (the fault leaves ECX/ESI/EDI at the first byte not copied, CR2 at it; after the page is
# mapped the instruction finishes).
        .include "common32.inc"
        .include "conform.inc"

        .set PT_BASE, 0x400000          # 4 KiB pages for 0x400000-0x7fffff (page_table)
        .set PAGE_RW, PT_BASE + 0x1000  # present, writable
        .set PAGE_RO, PT_BASE + 0x2000  # present, read-only
        .set PAGE_GAP, PT_BASE + 0x4000 # not present at first
        .set BIG, 0x800000              # a 4 MiB page
        .set PTE_A, 0x20
        .set PTE_D, 0x40

        .text
        .globl main
main:
        call idt_install
        # PDE 0: 4 MiB page 0 (kernel); PDE 1: page_table; PDE 2: 4 MiB page at 8 MiB; PDE 3-1023
        # 4 MiB pages (the LAPIC); all A/D clear
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $22, %eax
        orl $0x83, %eax
        movl %eax, page_directory(,%ecx,4)
        incl %ecx
        cmpl $1024, %ecx
        jb 1b
        movl $page_table + 3, page_directory + 4
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        addl $PT_BASE, %eax
        orl $3, %eax
        movl %eax, page_table(,%ecx,4)
        incl %ecx
        cmpl $1024, %ecx
        jb 1b
        andl $~2, page_table + 2 * 4                # PAGE_RO: read-only
        movl $0, page_table + 4 * 4                 # PAGE_GAP: not present
        movl %cr4, %eax
        orl $(1 << 4), %eax
        movl %eax, %cr4
        movl $page_directory, %eax
        movl %eax, %cr3
        movl %cr0, %eax
        orl $0x80000000, %eax
        movl %eax, %cr0

        # --- a read sets A only; a write sets A and D (4 KiB page)
        movl PAGE_RW, %eax
        movl page_table + 1 * 4, %eax
        andl $(PTE_A | PTE_D), %eax
        CHECK paging.read_sets_accessed, %eax, $PTE_A
        movl $1, PAGE_RW
        movl page_table + 1 * 4, %eax
        andl $(PTE_A | PTE_D), %eax
        CHECK paging.write_sets_dirty, %eax, $(PTE_A | PTE_D)
        movl page_directory + 4, %eax
        andl $PTE_D, %eax
        CHECK paging.pde_of_table_no_dirty, %eax, $0
        # --- the same on a 4 MiB page: D lives in the PDE
        movl BIG, %eax
        movl page_directory + 8, %eax
        andl $(PTE_A | PTE_D), %eax
        CHECK paging.large_read_sets_accessed, %eax, $PTE_A
        movl $1, BIG
        movl page_directory + 8, %eax
        andl $(PTE_A | PTE_D), %eax
        CHECK paging.large_write_sets_dirty, %eax, $(PTE_A | PTE_D)

        # --- CR0.WP=0: a supervisor write to a read-only page succeeds; WP=1: #PF(P|W)
        movl $7, PAGE_RO
        movl PAGE_RO, %eax
        CHECK paging.wp0_supervisor_write, %eax, $7
        movl %cr0, %eax
        orl $(1 << 16), %eax
        movl %eax, %cr0
        FAULT_RESUME_AT 1f
        movl $8, PAGE_RO
1:      CHECK paging.wp1_write_faults, ev_log, $14
        CHECK paging.wp1_error_code, ev_error, $3
        movl %cr2, %eax
        CHECK paging.wp1_cr2, %eax, $PAGE_RO
        movl %cr0, %eax
        andl $~(1 << 16), %eax
        movl %eax, %cr0

        # --- REP MOVSB from PAGE_RW to the end of PAGE_GAP-1 and on into PAGE_GAP
        FAULT_RESUME_AT 1f
        movl $PAGE_RW, %esi
        movl $PAGE_GAP - 16, %edi
        movl $64, %ecx
        cld
        rep movsb
1:      CHECK strings.movsb_faults, ev_log, $14
        CHECK strings.movsb_error_code, ev_error, $2
        movl %cr2, %eax
        CHECK strings.movsb_cr2, %eax, $PAGE_GAP
        movl %ecx, %ebx
        CHECK strings.movsb_ecx_left, %ebx, $48
        CHECK strings.movsb_edi_at_fault, %edi, $PAGE_GAP
        movl %esi, %ebx
        CHECK strings.movsb_esi_at_fault, %ebx, $(PAGE_RW + 16)
        # map the page and go on: the instruction completes where it stopped
        movl $PAGE_GAP + 3, page_table + 4 * 4
        invlpg PAGE_GAP
        rep movsb
        CHECK strings.movsb_resumed_ecx, %ecx, $0
        movl PAGE_GAP + 44, %eax
        movl PAGE_RW + 60, %ebx
        CHECK strings.movsb_copied_tail, %eax, %ebx
        call done

        .bss
        .p2align 12
page_directory:
        .skip 4096
page_table:
        .skip 4096
