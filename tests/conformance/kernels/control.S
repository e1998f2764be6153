# control.S - CPUID dynamic bits, CR0/CR4/EFER reserved-bit checks, MSR reads (SDM vol. 2
# CPUID, MOV to CR, WRMSR; vol. 3 2.5 and 2.2.1).  Risky checks (ones that leave the CPU in a
# broken mode if they do not fault) run last.
        .include "common32.inc"
        .include "conform.inc"

        .set CR4_OSXSAVE, 1 << 18
        .set CPUID1_ECX_XSAVE, 1 << 26
        .set CPUID1_ECX_OSXSAVE, 1 << 27

        .text
        .globl main
main:
        call idt_install
        # --- CPUID.1:ECX.OSXSAVE reads CR4.OSXSAVE
        movl $1, %eax
        cpuid
        testl $CPUID1_ECX_XSAVE, %ecx
        jnz 1f
        SKIP cpuid.osxsave_clear_with_cr4, "XSAVE not announced"
        SKIP cpuid.osxsave_set_with_cr4, "XSAVE not announced"
        jmp 2f
1:      movl %cr4, %eax
        andl $~CR4_OSXSAVE, %eax
        movl %eax, %cr4
        movl $1, %eax
        cpuid
        andl $CPUID1_ECX_OSXSAVE, %ecx
        CHECK cpuid.osxsave_clear_with_cr4, %ecx, $0
        movl %cr4, %eax
        orl $CR4_OSXSAVE, %eax
        movl %eax, %cr4
        movl $1, %eax
        cpuid
        andl $CPUID1_ECX_OSXSAVE, %ecx
        CHECK cpuid.osxsave_set_with_cr4, %ecx, $CPUID1_ECX_OSXSAVE
        movl %cr4, %eax
        andl $~CR4_OSXSAVE, %eax
        movl %eax, %cr4
2:
        # --- CPUID.1:EBX[31:24] is the initial APIC ID, which the LAPIC ID register shows
        movl $1, %eax
        cpuid
        shrl $24, %ebx
        movl LAPIC + LAPIC_ID, %eax
        shrl $24, %eax
        CHECK cpuid.apic_id_matches_lapic, %ebx, %eax

        # --- IA32_APIC_BASE after startup agrees with the APIC: enabled, BSP, at 0xfee00000
        movl $0x1b, %ecx
        rdmsr
        movl %eax, %ebx
        andl $0x800, %ebx
        CHECK msr.apic_base_enabled, %ebx, $0x800
        movl %eax, %ebx
        andl $0x100, %ebx
        CHECK msr.apic_base_bsp, %ebx, $0x100
        andl $0xfffff000, %eax
        CHECK msr.apic_base_address, %eax, $0xfee00000
        # an enabled APIC answers: version 0x1X, SVR writes read back
        movl LAPIC + LAPIC_VERSION, %eax
        andl $0xf0, %eax
        CHECK lapic.version_is_integrated, %eax, $0x10
        movl $0x1ff, LAPIC + LAPIC_SVR
        movl LAPIC + LAPIC_SVR, %eax
        andl $0x1ff, %eax
        CHECK lapic.svr_reads_back, %eax, $0x1ff

        # --- MSRs: EFER round trip, a reserved EFER bit and an MSR that does not exist (#GP)
        movl $0xc0000080, %ecx
        rdmsr
        movl %eax, %ebx
        FAULT_RESUME_AT 1f
        movl $0xc0000080, %ecx
        movl %ebx, %eax
        orl $0x2, %eax                  # bit 1: reserved
        xorl %edx, %edx
        wrmsr
1:      CHECK msr.efer_reserved_bit_gp, ev_log, $13
        FAULT_RESUME_AT 1f
        movl $0x13371337, %ecx
        rdmsr
1:      CHECK msr.rdmsr_unknown_gp, ev_log, $13
        FAULT_RESUME_AT 1f
        movl $0x13371337, %ecx
        xorl %eax, %eax
        xorl %edx, %edx
        wrmsr
1:      CHECK msr.wrmsr_unknown_gp, ev_log, $13
        # SYSENTER_CS round trip (an MSR every CPU model here implements)
        movl $0x174, %ecx
        movl $0x1234, %eax
        xorl %edx, %edx
        wrmsr
        xorl %eax, %eax
        rdmsr
        CHECK msr.sysenter_cs_round_trip, %eax, $0x1234

        # a CR4 bit that is announced (PSE, CPUID.1:EDX bit 3) can be set and read back
        movl %cr4, %eax
        orl $(1 << 4), %eax
        movl %eax, %cr4
        movl %cr4, %eax
        andl $(1 << 4), %eax
        CHECK cr4.pse_sets, %eax, $(1 << 4)

        # --- CR0: NW without CD, then PG without PE: #GP(0)
        FAULT_RESUME_AT 1f
        movl %cr0, %eax
        andl $~(1 << 30), %eax
        orl $(1 << 29), %eax
        movl %eax, %cr0
1:      CHECK cr0.nw_without_cd_gp, ev_log, $13
        movl %cr0, %eax
        andl $~(1 << 29), %eax
        movl %eax, %cr0
        FAULT_RESUME_AT 1f
        movl %cr0, %eax
        andl $~1, %eax
        orl $(1 << 31), %eax
        movl %eax, %cr0
1:      CHECK cr0.pg_without_pe_gp, ev_log, $13
        call done
