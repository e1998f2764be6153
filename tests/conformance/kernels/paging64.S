# paging64.S - 4-level paging features (SDM vol. 3 4.5-4.10): accessed and dirty bits of 4 KiB,
# 2 MiB and 1 GiB pages and of the paging-structure entries above them; NX (a reserved bit
# without EFER.NXE, an instruction-fetch #PF with it); SMEP and SMAP where CPUID announces them
# (#GP on the CR4 write where it does not); PCID (CR3 PCIDs, the no-flush bit, #GP setting
# CR4.PCIDE with a non-zero PCID) and INVPCID where announced.
        .include "common32.inc"
        .include "conform64.inc"

        .set WINDOW, 0x40000000         # 4 KiB pages (page_table) at the start of GiB 1
        .set FRAMES, 0x600000           # ... backed by the frames from 6 MiB
        .set PAGE_RW, WINDOW
        .set PAGE_NX, WINDOW + 0x1000
        .set PAGE_USER, WINDOW + 0x2000
        .set PAGE_ALIAS, WINDOW + 0x3000
        .set BIG, 0x800000              # a 2 MiB page (PD index 4 of GiB 0)
        .set HUGE_VIRT, 0x100000000     # PDPT[4]: a 1 GiB page of physical 0
        .set A, 0x20
        .set D, 0x40
        .set NX_BIT_HIGH, 0x80000000    # bit 63, in the entry's high dword
        .set CR4_PCIDE, 1 << 17
        .set CR4_SMEP, 1 << 20
        .set CR4_SMAP, 1 << 21
        .set FLAGS_AC, 1 << 18

        .bss
        .p2align 12
page_table: .skip 4096
        .p2align 3
marker:     .quad 0
        .p2align 4
invpcid_descriptor: .skip 16

        .text
        .code64
# flush: reload CR3 (no global pages here: every translation goes)
flush:
        pushq %rax
        movq %cr3, %rax
        movq %rax, %cr3
        popq %rax
        ret

        .globl main64
main64:
        # the window: four 4 KiB pages; the second NX (set below), the third a user page, the
        # fourth an alias of the first frame's neighbour (re-pointed by the INVPCID check)
        leaq page_table(%rip), %rdi
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        addl $FRAMES + 3, %eax
        movl %eax, (%rdi,%rcx,8)
        movl $0, 4(%rdi,%rcx,8)
        incl %ecx
        cmpl $16, %ecx
        jb 1b
        orl $4, 2 * 8(%rdi)                         # PAGE_USER: U
        movl $FRAMES + 0x4000 + 3, 3 * 8(%rdi)      # PAGE_ALIAS -> frame 4
        movb $0xC3, FRAMES + 0x1000                 # a RET in the NX page and in the user page
        movb $0xC3, FRAMES + 0x2000
        leaq page_table + 7(%rip), %rax
        movq %rax, c64_pd + 4096(%rip)              # GiB 1, PD index 0 (U above the leaves)
        call flush

        # --- A/D: clear them in every level of PAGE_RW's walk, read, then write
        andq $~(A | D), page_table(%rip)
        andq $~A, c64_pd + 4096(%rip)
        andq $~A, c64_pdpt + 8(%rip)
        andq $~A, c64_pml4(%rip)
        call flush
        movq PAGE_RW, %rax
        movq page_table(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.read_sets_accessed, %rax, $A
        movq c64_pd + 4096(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.pde_accessed_not_dirty, %rax, $A
        movq c64_pdpt + 8(%rip), %rax
        andq $A, %rax
        CHECK64 paging64.pdpte_accessed, %rax, $A
        movq c64_pml4(%rip), %rax
        andq $A, %rax
        CHECK64 paging64.pml4e_accessed, %rax, $A
        movq $1, PAGE_RW
        movq page_table(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.write_sets_dirty, %rax, $(A | D)
        # a 2 MiB page: A and D in the PDE
        andq $~(A | D), c64_pd + 4 * 8(%rip)
        invlpg BIG
        movq BIG, %rax
        movq c64_pd + 4 * 8(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.large_2m_read_sets_accessed, %rax, $A
        movq $1, BIG
        movq c64_pd + 4 * 8(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.large_2m_write_sets_dirty, %rax, $(A | D)

        # --- a 1 GiB page (CPUID 0x80000001 EDX bit 26)
        movl $0x80000001, %eax
        xorl %ecx, %ecx
        movl $3, %edx
        movl $26, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        SKIP64 paging64.huge_1g_maps, "1 GiB pages not announced"
        SKIP64 paging64.huge_1g_accessed, "1 GiB pages not announced"
        SKIP64 paging64.huge_1g_dirty, "1 GiB pages not announced"
        jmp 2f
1:      movq $0x83, c64_pdpt + 4 * 8(%rip)           # physical 0, present, writable, PS
        movabsq $0x0123456789ABCDEF, %rax
        movq %rax, marker(%rip)
        leaq marker(%rip), %rbx
        movabsq $HUGE_VIRT, %rcx
        movq (%rbx,%rcx), %rdx
        CHECK64 paging64.huge_1g_maps, %rdx, %rax
        movq c64_pdpt + 4 * 8(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.huge_1g_accessed, %rax, $A
        movq $5, (%rbx,%rcx)
        movq c64_pdpt + 4 * 8(%rip), %rax
        andq $(A | D), %rax
        CHECK64 paging64.huge_1g_dirty, %rax, $(A | D)
        movq $0, c64_pdpt + 4 * 8(%rip)
        call flush
2:
        call nx_checks
        call smep_smap_checks
        call pcid_checks
        ret

# --- NX (CPUID 0x80000001 EDX bit 20)
nx_checks:
        movl $0x80000001, %eax
        xorl %ecx, %ecx
        movl $3, %edx
        movl $20, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        SKIP64 paging64.nx_reserved_without_nxe, "NX not announced"
        SKIP64 paging64.nx_reserved_error, "NX not announced"
        SKIP64 paging64.nx_data_read, "NX not announced"
        SKIP64 paging64.nx_fetch_faults, "NX not announced"
        SKIP64 paging64.nx_fetch_error, "NX not announced"
        SKIP64 paging64.nx_fetch_cr2, "NX not announced"
        ret
1:      orl $NX_BIT_HIGH, page_table + 8 + 4(%rip)
        invlpg PAGE_NX
        # EFER.NXE=0: bit 63 is reserved: #PF(P | RSVD) on a read
        FAULT64 2f
        movb PAGE_NX, %al
2:      CHECK64 paging64.nx_reserved_without_nxe, ev_vector(%rip), $14
        CHECK64 paging64.nx_reserved_error, ev_error(%rip), $0x9
        movl $EFER_MSR, %ecx
        rdmsr
        orl $(1 << 11), %eax            # NXE
        wrmsr
        invlpg PAGE_NX
        xorl %eax, %eax
        movb PAGE_NX, %al
        CHECK64 paging64.nx_data_read, %rax, $0xC3
        movq %rsp, %rbp
        FAULT64 2f
        movl $PAGE_NX, %ebx
        call *%rbx
2:      movq %rbp, %rsp
        CHECK64 paging64.nx_fetch_faults, ev_vector(%rip), $14
        CHECK64 paging64.nx_fetch_error, ev_error(%rip), $0x11
        movq %cr2, %rax
        CHECK64 paging64.nx_fetch_cr2, %rax, $PAGE_NX
        ret

# --- SMEP (CPUID 7.0 EBX bit 7) and SMAP (bit 20)
smep_smap_checks:
        movl $7, %eax
        xorl %ecx, %ecx
        movl $1, %edx
        movl $7, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        FAULT64 2f
        movq %cr4, %rax
        orq $CR4_SMEP, %rax
        movq %rax, %cr4
2:      CHECK64 paging64.smep_unannounced_gp, ev_vector(%rip), $13
        SKIP64 paging64.smep_fetch_faults, "SMEP not announced"
        SKIP64 paging64.smep_fetch_error, "SMEP not announced"
        jmp 3f
1:      SKIP64 paging64.smep_unannounced_gp, "SMEP announced"
        movl $PAGE_USER, %ebx
        call *%rbx                      # SMEP off: a supervisor fetch from a user page works
        movq %cr4, %rax
        orq $CR4_SMEP, %rax
        movq %rax, %cr4
        movq %rsp, %rbp
        FAULT64 2f
        call *%rbx
2:      movq %rbp, %rsp
        movq %cr4, %rax
        andq $~CR4_SMEP, %rax
        movq %rax, %cr4
        CHECK64 paging64.smep_fetch_faults, ev_vector(%rip), $14
        CHECK64 paging64.smep_fetch_error, ev_error(%rip), $0x11
3:      movl $7, %eax
        xorl %ecx, %ecx
        movl $1, %edx
        movl $20, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        FAULT64 2f
        movq %cr4, %rax
        orq $CR4_SMAP, %rax
        movq %rax, %cr4
2:      CHECK64 paging64.smap_unannounced_gp, ev_vector(%rip), $13
        SKIP64 paging64.smap_read_faults, "SMAP not announced"
        SKIP64 paging64.smap_read_error, "SMAP not announced"
        SKIP64 paging64.smap_ac_allows, "SMAP not announced"
        SKIP64 paging64.smap_ac_no_fault, "SMAP not announced"
        ret
1:      SKIP64 paging64.smap_unannounced_gp, "SMAP announced"
        movq %cr4, %rax
        orq $CR4_SMAP, %rax
        movq %rax, %cr4
        FAULT64 2f
        movb PAGE_USER, %al
2:      CHECK64 paging64.smap_read_faults, ev_vector(%rip), $14
        CHECK64 paging64.smap_read_error, ev_error(%rip), $0x1
        call ev_reset64
        pushfq
        orq $FLAGS_AC, (%rsp)
        popfq
        xorl %eax, %eax
        movb PAGE_USER, %al             # EFLAGS.AC=1: allowed
        pushfq
        andq $~FLAGS_AC, (%rsp)
        popfq
        CHECK64 paging64.smap_ac_allows, %rax, $0xC3
        CHECK64 paging64.smap_ac_no_fault, ev_count(%rip), $0
        movq %cr4, %rax
        andq $~CR4_SMAP, %rax
        movq %rax, %cr4
        ret

# --- PCID (CPUID 1 ECX bit 17) and INVPCID (7.0 EBX bit 10)
pcid_checks:
        movl $1, %eax
        xorl %ecx, %ecx
        movl $2, %edx
        movl $17, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        FAULT64 2f
        movq %cr4, %rax
        orq $CR4_PCIDE, %rax
        movq %rax, %cr4
2:      CHECK64 paging64.pcid_unannounced_gp, ev_vector(%rip), $13
        movq %cr4, %rax                 # (had the write succeeded)
        andq $~CR4_PCIDE, %rax
        movq %rax, %cr4
        SKIP64 paging64.pcide_with_nonzero_cr3_low_gp, "PCID not announced"
        SKIP64 paging64.pcide_set, "PCID not announced"
        SKIP64 paging64.cr3_keeps_pcid, "PCID not announced"
        SKIP64 paging64.cr3_noflush_bit_not_kept, "PCID not announced"
        jmp invpcid_checks
1:      SKIP64 paging64.pcid_unannounced_gp, "PCID announced"
        leaq c64_pml4(%rip), %rbx
        movq %rbx, %rax
        orq $1, %rax                    # CR3[11:0] = 1 while CR4.PCIDE=0 (bits ignored)
        movq %rax, %cr3
        FAULT64 2f
        movq %cr4, %rax
        orq $CR4_PCIDE, %rax
        movq %rax, %cr4
2:      CHECK64 paging64.pcide_with_nonzero_cr3_low_gp, ev_vector(%rip), $13
        movq %rbx, %cr3
        movq %cr4, %rax
        orq $CR4_PCIDE, %rax
        movq %rax, %cr4
        movq %cr4, %rax
        andq $CR4_PCIDE, %rax
        CHECK64 paging64.pcide_set, %rax, $CR4_PCIDE
        movq %rbx, %rax
        orq $5, %rax
        movq %rax, %cr3
        movq %cr3, %rax
        movq %rbx, %rdx
        orq $5, %rdx
        CHECK64 paging64.cr3_keeps_pcid, %rax, %rdx
        movq %rbx, %rax
        orq $6, %rax
        btsq $63, %rax                  # no flush: bit 63 is not kept
        movq %rax, %cr3
        movq %cr3, %rax
        movq %rbx, %rdx
        orq $6, %rdx
        CHECK64 paging64.cr3_noflush_bit_not_kept, %rax, %rdx
        movq %rbx, %cr3
        movq %cr4, %rax
        andq $~CR4_PCIDE, %rax
        movq %rax, %cr4

invpcid_checks:
        movl $7, %eax
        xorl %ecx, %ecx
        movl $1, %edx
        movl $10, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        SKIP64 paging64.invpcid_address_refetches, "INVPCID not announced"
        SKIP64 paging64.invpcid_bad_type_gp, "INVPCID not announced"
        FAULT64 2f
        xorl %eax, %eax
        invpcid invpcid_descriptor(%rip), %rax
2:      CHECK64 paging64.invpcid_unannounced_ud, ev_vector(%rip), $6
        ret
1:      SKIP64 paging64.invpcid_unannounced_ud, "INVPCID announced"
        movq $0, invpcid_descriptor(%rip)
        movq $PAGE_ALIAS, invpcid_descriptor + 8(%rip)
        movq $0x1111, FRAMES + 0x4000
        movq $0x2222, FRAMES + 0x5000
        movq PAGE_ALIAS, %rax           # cached: frame 4
        movl $FRAMES + 0x5000 + 3, page_table + 3 * 8(%rip)
        xorl %eax, %eax                 # type 0: this address, PCID 0
        invpcid invpcid_descriptor(%rip), %rax
        movq PAGE_ALIAS, %rax
        CHECK64 paging64.invpcid_address_refetches, %rax, $0x2222
        movl $2, %eax                   # type 2: everything, globals too
        invpcid invpcid_descriptor(%rip), %rax
        FAULT64 2f
        movl $4, %eax                   # type 4: reserved
        invpcid invpcid_descriptor(%rip), %rax
2:      CHECK64 paging64.invpcid_bad_type_gp, ev_vector(%rip), $13
        ret
