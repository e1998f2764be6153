# lapic.S - the local APIC in xAPIC mode (SDM vol. 3 ch. 10): registers, task priority and
# processor priority, EOI retiring the highest in-service vector, IPI shorthands, software
# disable masking the LVTs, the timer (one-shot, periodic, masked, current count, divide
# configuration), x2APIC and the TSC-deadline timer where CPUID announces them (a #GP on
# their MSRs where it does not).
        .include "common32.inc"
        .include "conform.inc"

        .set LAPIC_LINT0, 0x350
        .set LAPIC_PPR, 0xa0
        .set LAPIC_LVT_ERROR, 0x370
        .set TIMER_VECTOR, 0x70
        .set MSR_APIC_BASE, 0x1b
        .set MSR_TSC_DEADLINE, 0x6e0

        .macro SELF_IPI vector
        movl $0, LAPIC + LAPIC_ICR_HI
        movl $(0x40000 | \vector), LAPIC + LAPIC_ICR_LO
        .endm

        .macro EOI
        movl $0, LAPIC + LAPIC_EOI
        .endm

        .bss
ppr_in_65:      .long 0
isr_in_65:      .long 0
cpuid1_ecx:     .long 0
version:        .long 0
count1:         .long 0
count2:         .long 0

        .text
# spin: %ecx iterations of PAUSE (time for an interrupt that must not come to come anyway).
spin:
1:      pause
        loop 1b
        ret

# irr_bit / isr_bit: %eax = vector -> %eax = that vector's bit in IRR / ISR (0 or 1).
irr_bit:
        pushl %ecx
        movl %eax, %ecx
        shrl $5, %eax
        shll $4, %eax
        movl LAPIC + LAPIC_IRR(%eax), %eax
        shrl %cl, %eax
        andl $1, %eax
        popl %ecx
        ret
isr_bit:
        pushl %ecx
        movl %eax, %ecx
        shrl $5, %eax
        shll $4, %eax
        movl LAPIC + LAPIC_ISR(%eax), %eax
        shrl %cl, %eax
        andl $1, %eax
        popl %ecx
        ret

        .globl main
main:
        call idt_install
        movb $0xff, %al                 # 8259 masked: the firmware's PIT tick must not come in
        outb %al, $0x21
        outb %al, $0xa1
        movl $1, %eax
        cpuid
        movl %ecx, cpuid1_ecx
        movl $1, eoi_vectors
        movl $0x1ff, LAPIC + LAPIC_SVR
        movl $0, LAPIC + LAPIC_TPR

        # --- registers
        movl LAPIC + LAPIC_VERSION, %eax
        movl %eax, version
        movl %eax, %ebx
        andl $0xf0, %ebx
        CHECK lapic.version_integrated, %ebx, $0x10          # 0x1X: an integrated APIC
        shrl $16, %eax
        andl $0xff, %eax
        cmpl $4, %eax
        setae %bl
        movzbl %bl, %ebx
        CHECK lapic.version_at_least_5_lvts, %ebx, $1
        movl LAPIC + LAPIC_SVR, %eax
        andl $0x1ff, %eax
        CHECK lapic.svr_read_back, %eax, $0x1ff
        movl $0xffffffff, LAPIC + LAPIC_TIMER_DIV
        movl LAPIC + LAPIC_TIMER_DIV, %eax
        CHECK lapic.divide_config_bits, %eax, $0xb           # bits 0, 1 and 3 only
        movl $0xb, LAPIC + LAPIC_TIMER_DIV                    # divide by 1

        # --- task priority: a vector whose class is not above TPR's waits in IRR
        call ev_reset
        movl $0x50, LAPIC + LAPIC_TPR
        sti
        SELF_IPI 0x45
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK lapic.tpr_holds_lower_class, %ebx, $0
        movl $0x45, %eax
        call irr_bit
        CHECK lapic.tpr_held_vector_in_irr, %eax, $1
        SELF_IPI 0x65
        movl $1, %ecx
        call wait_events
        CHECK lapic.tpr_passes_higher_class, ev_log, $0x65
        movl $0, LAPIC + LAPIC_TPR
        movl $2, %ecx
        call wait_events
        CHECK lapic.tpr_lowered_delivers, ev_log+4, $0x45
        cli

        # --- in service: PPR is the class of the highest ISR bit; EOI retires the highest one
        call ev_reset
        movl $0, eoi_vectors
        sti
        SELF_IPI 0x65
        movl $1, %ecx
        call wait_events
        movl $0x65, %eax
        call isr_bit
        movl %eax, isr_in_65
        movl LAPIC + LAPIC_PPR, %eax
        andl $0xf0, %eax
        movl %eax, ppr_in_65
        SELF_IPI 0x55                   # lower class than the one in service: waits
        SELF_IPI 0x75                   # higher: nests
        movl $2, %ecx
        call wait_events
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK lapic.isr_set_until_eoi, isr_in_65, $1
        CHECK lapic.ppr_is_isr_class, ppr_in_65, $0x60
        CHECK lapic.higher_class_nests, ev_log+4, $0x75
        CHECK lapic.lower_class_waits_for_eoi, %ebx, $2
        EOI                             # retires 0x75, the highest; 0x65 still in service
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK lapic.eoi_retires_highest_first, %ebx, $2
        movl $0x65, %eax
        call isr_bit
        CHECK lapic.eoi_leaves_lower_in_service, %eax, $1
        EOI                             # retires 0x65: 0x55 comes in
        movl $3, %ecx
        call wait_events
        CHECK lapic.eoi_releases_waiting, ev_log+8, $0x55
        EOI
        movl $0x55, %eax
        call isr_bit
        CHECK lapic.isr_clear_after_eoi, %eax, $0
        cli
        movl $1, eoi_vectors

        # --- IPI shorthands: all-including-self reaches us, all-excluding-self does not
        call ev_reset
        sti
        movl $0, LAPIC + LAPIC_ICR_HI
        movl $(0xc0000 | 0x66), LAPIC + LAPIC_ICR_LO
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK lapic.ipi_all_excluding_self, %ebx, $0
        movl $(0x80000 | 0x67), LAPIC + LAPIC_ICR_LO
        movl $1, %ecx
        call wait_events
        CHECK lapic.ipi_all_including_self, ev_log, $0x67
        movl LAPIC + LAPIC_ICR_LO, %eax
        andl $0x1000, %eax
        CHECK lapic.icr_delivery_idle, %eax, $0
        cli

        # --- software disable masks every LVT, and no mask bit can be cleared until enabled
        movl $TIMER_VECTOR, LAPIC + LAPIC_LVT_TIMER
        movl $0x0ff, LAPIC + LAPIC_SVR
        movl LAPIC + LAPIC_LVT_TIMER, %eax
        andl $0x10000, %eax
        CHECK lapic.sw_disable_masks_timer, %eax, $0x10000
        movl LAPIC + LAPIC_LINT0, %eax
        andl $0x10000, %eax
        CHECK lapic.sw_disable_masks_lint0, %eax, $0x10000
        movl $TIMER_VECTOR, LAPIC + LAPIC_LVT_TIMER
        movl LAPIC + LAPIC_LVT_TIMER, %eax
        andl $0x10000, %eax
        CHECK lapic.sw_disabled_mask_stays, %eax, $0x10000
        movl $0x1ff, LAPIC + LAPIC_SVR
        movl LAPIC + LAPIC_LVT_TIMER, %eax
        andl $0x10000, %eax
        CHECK lapic.sw_enable_keeps_masks, %eax, $0x10000

        # --- timer: current count counts down from the initial count; 0 stops it
        movl $(0x10000 | TIMER_VECTOR), LAPIC + LAPIC_LVT_TIMER
        movl $0x10000000, LAPIC + LAPIC_TIMER_INIT
        movl LAPIC + LAPIC_TIMER_CUR, %eax
        movl %eax, count1
        movl $100000, %ecx
        call spin
        movl LAPIC + LAPIC_TIMER_CUR, %eax
        movl %eax, count2
        movl count1, %eax
        cmpl $0x10000000, %eax
        setbe %al
        movzbl %al, %eax
        CHECK lapic.timer_current_at_most_initial, %eax, $1
        movl count2, %eax
        cmpl count1, %eax
        setb %al
        movzbl %al, %eax
        CHECK lapic.timer_current_counts_down, %eax, $1
        movl LAPIC + LAPIC_TIMER_INIT, %eax
        CHECK lapic.timer_initial_read_back, %eax, $0x10000000
        movl $0, LAPIC + LAPIC_TIMER_INIT
        movl LAPIC + LAPIC_TIMER_CUR, %eax
        CHECK lapic.timer_zero_initial_stops, %eax, $0

        # --- one-shot: one interrupt, then the current count stays 0
        call ev_reset
        sti
        movl $TIMER_VECTOR, LAPIC + LAPIC_LVT_TIMER
        movl $100000, LAPIC + LAPIC_TIMER_INIT
        movl $1, %ecx
        call wait_events
        movl $2, %ecx                   # a second one must not come
        call wait_events
        cli
        movl ev_count, %ebx
        CHECK lapic.oneshot_vector, ev_log, $TIMER_VECTOR
        CHECK lapic.oneshot_once, %ebx, $1
        movl LAPIC + LAPIC_TIMER_CUR, %eax
        CHECK lapic.oneshot_current_zero, %eax, $0

        # --- periodic: interrupts keep coming, the current count reloads
        call ev_reset
        sti
        movl $(0x20000 | TIMER_VECTOR), LAPIC + LAPIC_LVT_TIMER
        movl $100000, LAPIC + LAPIC_TIMER_INIT
        movl $3, %ecx
        call wait_events
        movl LAPIC + LAPIC_TIMER_CUR, %edx
        movl $0, LAPIC + LAPIC_TIMER_INIT
        cli
        movl ev_count, %eax
        cmpl $3, %eax
        setae %al
        movzbl %al, %eax
        CHECK lapic.periodic_repeats, %eax, $1
        CHECK lapic.periodic_vector, ev_log+8, $TIMER_VECTOR
        testl %edx, %edx
        setnz %al
        movzbl %al, %eax
        CHECK lapic.periodic_current_reloads, %eax, $1

        # --- masked: no interrupt, the count still runs out
        call ev_reset
        sti
        movl $(0x10000 | TIMER_VECTOR), LAPIC + LAPIC_LVT_TIMER
        movl $100000, LAPIC + LAPIC_TIMER_INIT
        movl $1, %ecx
        call wait_events
        cli
        movl ev_count, %ebx
        CHECK lapic.masked_timer_silent, %ebx, $0
        movl LAPIC + LAPIC_TIMER_CUR, %eax
        CHECK lapic.masked_timer_runs_out, %eax, $0

        call x2apic_checks
        call tsc_deadline_checks
        # --- an illegal vector (below 16) is not sent (SDM 10.5.2); ESR reports it after a
        # write to ESR (10.5.3). Last: a CPU that accepts it anyway must not disturb the rest.
        movl $0, LAPIC + LAPIC_ESR
        movl $0, LAPIC + LAPIC_ESR
        call ev_reset
        sti
        SELF_IPI 0x05
        movl $200000, %ecx
        call spin
        cli
        movl ev_count, %ebx
        CHECK lapic.illegal_vector_not_delivered, %ebx, $0
        movl $0, LAPIC + LAPIC_ESR
        movl LAPIC + LAPIC_ESR, %eax
        andl $0x20, %eax
        CHECK lapic.esr_send_illegal_vector, %eax, $0x20
        movl $0, LAPIC + LAPIC_ESR
        call done

# --- x2APIC (CPUID.1:ECX bit 21): its MSRs, self IPI, TPR and the mode transitions; where it
# is not announced, its MSRs and the enable bit raise #GP.
x2apic_checks:
        testl $(1 << 21), cpuid1_ecx
        jnz 2f
        FAULT_RESUME_AT 1f
        movl $0x802, %ecx
        rdmsr
1:      CHECK x2apic.unannounced_msr_gp, ev_log, $13
        FAULT_RESUME_AT 1f
        movl $MSR_APIC_BASE, %ecx
        rdmsr
        orl $0xc00, %eax
        wrmsr
1:      CHECK x2apic.unannounced_enable_gp, ev_log, $13
        SKIP x2apic.id_msr, "x2APIC not announced"
        SKIP x2apic.version_msr, "x2APIC not announced"
        SKIP x2apic.self_ipi, "x2APIC not announced"
        SKIP x2apic.tpr_holds, "x2APIC not announced"
        SKIP x2apic.icr_self, "x2APIC not announced"
        SKIP x2apic.to_xapic_gp, "x2APIC not announced"
        ret
2:      SKIP x2apic.unannounced_msr_gp, "x2APIC announced"
        SKIP x2apic.unannounced_enable_gp, "x2APIC announced"
        movl $MSR_APIC_BASE, %ecx
        rdmsr
        orl $0xc00, %eax
        wrmsr
        movl $0x802, %ecx
        rdmsr
        CHECK x2apic.id_msr, %eax, $0
        movl $0x803, %ecx
        rdmsr
        CHECK x2apic.version_msr, %eax, version
        call ev_reset
        sti
        movl $0x83f, %ecx               # SELF IPI register
        movl $0x68, %eax
        xorl %edx, %edx
        wrmsr
        movl $1, %ecx
        call wait_events
        CHECK x2apic.self_ipi, ev_log, $0x68
        movl $0x808, %ecx               # TPR
        movl $0x70, %eax
        wrmsr
        movl $0x830, %ecx               # ICR: shorthand self, fixed 0x69
        movl $(0x40000 | 0x69), %eax
        wrmsr
        movl $200000, %ecx
        call spin
        movl ev_count, %ebx
        CHECK x2apic.tpr_holds, %ebx, $1
        movl $0x808, %ecx
        xorl %eax, %eax
        wrmsr
        movl $2, %ecx
        call wait_events
        CHECK x2apic.icr_self, ev_log+4, $0x69
        cli
        FAULT_RESUME_AT 1f              # x2APIC -> xAPIC directly is an invalid transition
        movl $MSR_APIC_BASE, %ecx
        rdmsr
        andl $~0x400, %eax
        wrmsr
1:      CHECK x2apic.to_xapic_gp, ev_log, $13
        movl $MSR_APIC_BASE, %ecx       # disabled, then xAPIC again
        rdmsr
        andl $~0xc00, %eax
        wrmsr
        orl $0x800, %eax
        wrmsr
        movl $0x1ff, LAPIC + LAPIC_SVR
        ret

# --- TSC-deadline timer (CPUID.1:ECX bit 24): an interrupt once the TSC passes the deadline,
# which then reads 0; where it is not announced, IA32_TSC_DEADLINE raises #GP.
tsc_deadline_checks:
        testl $(1 << 24), cpuid1_ecx
        jnz 2f
        FAULT_RESUME_AT 1f
        movl $MSR_TSC_DEADLINE, %ecx
        rdmsr
1:      CHECK tscdeadline.unannounced_msr_gp, ev_log, $13
        SKIP tscdeadline.fires, "TSC deadline not announced"
        SKIP tscdeadline.initial_count_ignored, "TSC deadline not announced"
        SKIP tscdeadline.reads_zero_after, "TSC deadline not announced"
        ret
2:      SKIP tscdeadline.unannounced_msr_gp, "TSC deadline announced"
        call ev_reset
        sti
        movl $(0x40000 | TIMER_VECTOR), LAPIC + LAPIC_LVT_TIMER
        movl $0x12345, LAPIC + LAPIC_TIMER_INIT   # ignored in TSC-deadline mode
        movl LAPIC + LAPIC_TIMER_INIT, %eax
        movl %eax, count1
        rdtsc
        addl $1000000, %eax
        adcl $0, %edx
        movl $MSR_TSC_DEADLINE, %ecx
        wrmsr
        movl $1, %ecx
        call wait_events
        cli
        CHECK tscdeadline.fires, ev_log, $TIMER_VECTOR
        CHECK tscdeadline.initial_count_ignored, count1, $0
        movl $MSR_TSC_DEADLINE, %ecx
        rdmsr
        CHECK tscdeadline.reads_zero_after, %eax, $0
        ret
