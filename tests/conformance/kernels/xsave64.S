# xsave64.S - XSAVE state components (SDM vol. 1 13; vol. 2 XSAVE, XRSTOR, XSETBV, XGETBV;
# CPUID leaf 0xD): #UD while CR4.OSXSAVE=0; XCR0's reset value 1; XSETBV's #GP on XCR0 = 0,
# SSE without x87, AVX without SSE, a reserved bit, an XCR other than 0; CPUID 0xD sizes that
# follow XCR0; XSAVE of x87 and SSE state (and AVX where announced) in the standard format,
# XSTATE_BV, XRSTOR by the requested mask, the init state for a component XSTATE_BV leaves
# out, and XRSTOR's #GP on a bad header or a misaligned area.
        .include "common32.inc"
        .include "conform64.inc"

        .set CR4_OSFXSR, 1 << 9
        .set CR4_OSXMMEXCPT, 1 << 10
        .set CR4_OSXSAVE, 1 << 18
        .set XSTATE_BV, 512
        .set XCOMP_BV, 520

        .section .rodata
        .p2align 5
pattern:
        .quad 0x1111222233334444, 0x5555666677778888
        .quad 0x99990000AAAABBBB, 0xCCCCDDDDEEEEFFFF

        .bss
        .p2align 6
area:   .skip 4096
        .p2align 5
out:    .skip 32
avx_announced: .quad 0

        .text
        .code64
# xsetbv_eax: XCR0 (or XCR %ecx) = %eax (%edx = 0); its vector in ev_vector (-1 when it worked)
xsetbv_try:
        pushq %rdx
        call ev_reset64
        leaq 1f(%rip), %rdx
        movq %rdx, resume_rip(%rip)
        xorl %edx, %edx
        xsetbv
1:      movq $0, resume_rip(%rip)
        popq %rdx
        ret

clear_area:
        pushq %rdi
        pushq %rcx
        pushq %rax
        leaq area(%rip), %rdi
        movl $4096 / 8, %ecx
        xorl %eax, %eax
        rep stosq
        popq %rax
        popq %rcx
        popq %rdi
        ret

        .globl main64
main64:
        movq %cr0, %rax
        andq $~(1 << 2 | 1 << 3), %rax  # EM, TS off
        orq $(1 << 1), %rax             # MP
        movq %rax, %cr0
        movq %cr4, %rax
        orq $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
        movq %rax, %cr4
        movl $1, %eax
        xorl %ecx, %ecx
        movl $2, %edx
        movl $26, %ebx
        call cpuid_bit64
        testl %eax, %eax
        jnz 1f
        SKIP64 xsave.xgetbv_ud_without_osxsave, "XSAVE not announced"
        SKIP64 xsave.xsetbv_ud_without_osxsave, "XSAVE not announced"
        SKIP64 xsave.xsave_ud_without_osxsave, "XSAVE not announced"
        FAULT64 2f
        movq %cr4, %rax
        orq $CR4_OSXSAVE, %rax
        movq %rax, %cr4
2:      CHECK64 xsave.unannounced_cr4_gp, ev_vector(%rip), $13
        ret
1:      SKIP64 xsave.unannounced_cr4_gp, "XSAVE announced"
        movl $1, %eax
        xorl %ecx, %ecx
        movl $2, %edx
        movl $28, %ebx
        call cpuid_bit64
        movq %rax, avx_announced(%rip)

        movq %cr4, %rax
        orq $CR4_OSXSAVE, %rax
        movq %rax, %cr4
        movl $1, %eax
        xorl %ecx, %ecx
        cpuid
        shrl $27, %ecx
        andl $1, %ecx
        CHECK64 xsave.cpuid1_osxsave_follows_cr4, %rcx, $1
        xorl %ecx, %ecx
        xgetbv
        CHECK64 xsave.xcr0_reset_value, %rax, $1
        movl $0xD, %eax
        xorl %ecx, %ecx
        cpuid
        andl $3, %eax
        CHECK64 xsave.cpuid_d_x87_sse_supported, %rax, $3

        # --- XSETBV's checks
        xorl %ecx, %ecx
        xorl %eax, %eax
        call xsetbv_try
        CHECK64 xsave.xcr0_zero_gp, ev_vector(%rip), $13
        movl $2, %eax
        call xsetbv_try
        CHECK64 xsave.xcr0_sse_without_x87_gp, ev_vector(%rip), $13
        pushq %rdx
        call ev_reset64
        leaq 1f(%rip), %rdx
        movq %rdx, resume_rip(%rip)
        movl $1, %eax
        movl $0x80000000, %edx          # bit 63: reserved
        xsetbv
1:      popq %rdx
        CHECK64 xsave.xcr0_reserved_bit_gp, ev_vector(%rip), $13
        movl $1, %ecx
        movl $1, %eax
        call xsetbv_try
        CHECK64 xsave.xcr1_write_gp, ev_vector(%rip), $13
        xorl %ecx, %ecx
        movl $3, %eax
        call xsetbv_try
        CHECK64 xsave.xcr0_x87_sse_accepted, ev_vector(%rip), $-1
        xorl %ecx, %ecx
        xgetbv
        CHECK64 xsave.xcr0_reads_back, %rax, $3
        movl $0xD, %eax
        xorl %ecx, %ecx
        cpuid
        CHECK64 xsave.cpuid_d_size_follows_xcr0, %rbx, $576

        # --- XSAVE of x87 (ST0 = 1.0) and SSE (XMM0 = pattern) state
        call clear_area
        fninit
        fld1
        movdqu pattern(%rip), %xmm0
        movl $3, %eax
        xorl %edx, %edx
        xsave area(%rip)
        movq area + XSTATE_BV(%rip), %rax
        CHECK64 xsave.xstate_bv_x87_sse, %rax, $3
        movq area + 160(%rip), %rax
        CHECK64 xsave.xmm0_at_160, %rax, pattern(%rip)
        movl area + 24(%rip), %eax
        CHECK64 xsave.mxcsr_at_24, %rax, $0x1F80
        movq area + 32(%rip), %rax      # ST0: 80-bit 1.0
        movabsq $0x8000000000000000, %rdx
        CHECK64 xsave.st0_significand_at_32, %rax, %rdx
        movzwl area + 40(%rip), %eax
        CHECK64 xsave.st0_exponent_at_40, %rax, $0x3FFF
        # XRSTOR: everything requested comes back
        pxor %xmm0, %xmm0
        movl $3, %eax
        xorl %edx, %edx
        xrstor area(%rip)
        movq %xmm0, %rax
        CHECK64 xsave.xrstor_restores_xmm0, %rax, pattern(%rip)
        # XRSTOR of x87 only: XMM0 keeps what it has
        pxor %xmm0, %xmm0
        movl $1, %eax
        xorl %edx, %edx
        xrstor area(%rip)
        movq %xmm0, %rax
        CHECK64 xsave.xrstor_mask_leaves_sse, %rax, $0
        # XSTATE_BV without SSE: XRSTOR puts SSE in its init state (XMM0 = 0)
        movdqu pattern(%rip), %xmm0
        andq $~2, area + XSTATE_BV(%rip)
        movl $3, %eax
        xorl %edx, %edx
        xrstor area(%rip)
        movq %xmm0, %rax
        CHECK64 xsave.xrstor_init_when_bv_clear, %rax, $0
        orq $2, area + XSTATE_BV(%rip)

        # --- #GP: a misaligned area, a reserved header byte, XSTATE_BV outside XCR0
        FAULT64 2f
        movl $3, %eax
        xorl %edx, %edx
        xsave area + 8(%rip)
2:      CHECK64 xsave.misaligned_area_gp, ev_vector(%rip), $13
        movb $1, area + XCOMP_BV + 8(%rip)      # header bytes 23:16 must be 0
        FAULT64 2f
        movl $3, %eax
        xorl %edx, %edx
        xrstor area(%rip)
2:      movb $0, area + XCOMP_BV + 8(%rip)
        CHECK64 xsave.reserved_header_gp, ev_vector(%rip), $13
        orq $4, area + XSTATE_BV(%rip)          # AVX state while XCR0 = 3
        FAULT64 2f
        movl $7, %eax
        xorl %edx, %edx
        xrstor area(%rip)
2:      andq $~4, area + XSTATE_BV(%rip)
        CHECK64 xsave.xstate_bv_outside_xcr0_gp, ev_vector(%rip), $13

        # --- AVX (CPUID 1 ECX bit 28): XCR0 needs SSE with it; YMM upper halves at 576
        cmpq $0, avx_announced(%rip)
        jne 1f
        SKIP64 xsave.xcr0_avx_without_sse_gp, "AVX not announced"
        SKIP64 xsave.cpuid_d_size_with_avx, "AVX not announced"
        SKIP64 xsave.cpuid_d2_avx_offset, "AVX not announced"
        SKIP64 xsave.ymm0_upper_at_576, "AVX not announced"
        SKIP64 xsave.xrstor_restores_ymm0_upper, "AVX not announced"
        jmp ud_checks
1:      xorl %ecx, %ecx
        movl $5, %eax
        call xsetbv_try
        CHECK64 xsave.xcr0_avx_without_sse_gp, ev_vector(%rip), $13
        movl $7, %eax
        call xsetbv_try
        movl $0xD, %eax
        xorl %ecx, %ecx
        cpuid
        CHECK64 xsave.cpuid_d_size_with_avx, %rbx, $832
        movl $0xD, %eax
        movl $2, %ecx
        cpuid
        shlq $32, %rax
        orq %rbx, %rax
        movabsq $(256 << 32) | 576, %rdx
        CHECK64 xsave.cpuid_d2_avx_offset, %rax, %rdx
        call clear_area
        vmovdqu pattern(%rip), %ymm0
        movl $7, %eax
        xorl %edx, %edx
        xsave area(%rip)
        movq area + 576(%rip), %rax
        CHECK64 xsave.ymm0_upper_at_576, %rax, pattern + 16(%rip)
        vpxor %ymm0, %ymm0, %ymm0
        movl $7, %eax
        xorl %edx, %edx
        xrstor area(%rip)
        vmovdqu %ymm0, out(%rip)
        movq out + 24(%rip), %rax
        CHECK64 xsave.xrstor_restores_ymm0_upper, %rax, pattern + 24(%rip)

# --- CR4.OSXSAVE=0 again: CPUID.1:ECX.OSXSAVE reads 0; XGETBV, XSETBV and XSAVE are #UD
# (last: the nested kvm_pvm KVM cannot emulate the #UD of an XGETBV)
ud_checks:
        movq %cr4, %rax
        andq $~CR4_OSXSAVE, %rax
        movq %rax, %cr4
        movl $1, %eax
        xorl %ecx, %ecx
        cpuid
        shrl $27, %ecx
        andl $1, %ecx
        CHECK64 xsave.cpuid1_osxsave_clear, %rcx, $0
        FAULT64 2f
        xorl %ecx, %ecx
        xgetbv
2:      CHECK64 xsave.xgetbv_ud_without_osxsave, ev_vector(%rip), $6
        xorl %ecx, %ecx
        movl $1, %eax
        call xsetbv_try
        CHECK64 xsave.xsetbv_ud_without_osxsave, ev_vector(%rip), $6
        FAULT64 2f
        movl $1, %eax
        xorl %edx, %edx
        xsave area(%rip)
2:      CHECK64 xsave.xsave_ud_without_osxsave, ev_vector(%rip), $6
        ret
