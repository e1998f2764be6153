# user32.S - 32-bit protected mode events from CPL3 (SDM vol. 3 6.12.1): INT n through a DPL3
# gate and an external interrupt (a self-IPI) both switch to the TSS's SS0:ESP0 and push the
# user SS:ESP; IRET returns to CPL3.
        .include "common32.inc"
        .include "conform.inc"

        .set USER_CS, 0x1b
        .set USER_DS, 0x23
        .set TSS_SEL, 0x28

        .section .rodata
        .p2align 3
gdt_user:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08 code, DPL 0
        .quad 0x00CF93000000FFFF        # 0x10 data, DPL 0
        .quad 0x00CFFB000000FFFF        # 0x18 code, DPL 3
        .quad 0x00CFF3000000FFFF        # 0x20 data, DPL 3
gdt_user_tss_template:
        .quad 0                         # 0x28 TSS (filled at run time)
gdt_user_end:

        .data
        .p2align 3
gdt_rw:
        .skip gdt_user_end - gdt_user
gdtr_rw:
        .word gdt_user_end - gdt_user - 1
        .long gdt_rw

        .bss
        .p2align 4
tss32:  .skip 104
        .skip 4096
kernel_stack_top:
        .skip 4096
user_stack_top:
saved_esp:      .long 0
int80_cs:       .long 0
int80_top:      .long 0
ipi_vector:     .long 0
ipi_cs:         .long 0
ipi_top:        .long 0
ipi_count:      .long 0
sysenter_cs:    .long 0
sysenter_ss:    .long 0
sysenter_esp:   .long 0
sysexit_cs:     .long 0
sysexit_ss:     .long 0
sysexit_esp:    .long 0

        .text
        .globl main
main:
        call idt_install
        movl $1, eoi_vectors
        movl $0x1ff, LAPIC + LAPIC_SVR
        # GDT with user segments and a 32-bit TSS (base tss32, limit 103, type 9)
        movl $gdt_user, %esi
        movl $gdt_rw, %edi
        movl $(gdt_user_end - gdt_user) / 4, %ecx
        rep movsl
        movl $tss32, %eax
        movl %eax, %edx
        shll $16, %eax
        orl $103, %eax
        movl %eax, gdt_rw + TSS_SEL
        movl %edx, %eax
        shrl $16, %eax
        andl $0xFF, %eax
        andl $0xFF000000, %edx
        orl %edx, %eax
        orl $0x8900, %eax
        movl %eax, gdt_rw + TSS_SEL + 4
        lgdt gdtr_rw
        movl $kernel_stack_top, tss32 + 4     # ESP0
        movl $0x10, tss32 + 8                 # SS0
        movw $TSS_SEL, %ax
        ltr %ax
        # gate 0x81 (DPL 3): back to the kernel
        movl $back_to_kernel, %eax
        movw %ax, conf_idt + 0x81 * 8
        shrl $16, %eax
        movw %ax, conf_idt + 0x81 * 8 + 6
        # SYSENTER: CS from IA32_SYSENTER_CS (SS = CS + 8), ESP and EIP from their MSRs
        movl $0x174, %ecx
        movl $0x08, %eax
        xorl %edx, %edx
        wrmsr
        movl $0x175, %ecx
        movl $kernel_stack_top - 64, %eax
        wrmsr
        movl $0x176, %ecx
        movl $sysenter_entry, %eax
        wrmsr
        movl %esp, saved_esp
        call ev_reset
        pushl $USER_DS
        pushl $user_stack_top
        pushl $0x202                    # IF
        pushl $USER_CS
        pushl $user_code
        iret

user_code:
        movw $USER_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        int $0x80
        movl ev_cs, %eax
        movl %eax, int80_cs
        movl ev_top, %eax
        movl %eax, int80_top
        call ev_reset
        movl $0, LAPIC + LAPIC_ICR_HI
        movl $0x40044, LAPIC + LAPIC_ICR_LO   # self-IPI, vector 0x44, sent from CPL3
        movl $1000000, %ecx
1:      cmpl $0, ev_count
        jne 2f
        decl %ecx
        jnz 1b
2:      movl ev_count, %eax
        movl %eax, ipi_count
        movl ev_log, %eax
        movl %eax, ipi_vector
        movl ev_cs, %eax
        movl %eax, ipi_cs
        movl ev_top, %eax
        movl %eax, ipi_top
        # SYSENTER to CPL0 and SYSEXIT back (EDX: EIP, ECX: ESP; CS = SYSENTER_CS + 16 | 3)
        movl $user_stack_top - 32, %ecx
        movl $1f, %edx
        sysenter
1:      movw %cs, %ax
        movzwl %ax, %eax
        movl %eax, sysexit_cs
        movw %ss, %ax
        movzwl %ax, %eax
        movl %eax, sysexit_ss
        movl %esp, sysexit_esp
        int $0x81

sysenter_entry:
        movw %cs, %ax
        movzwl %ax, %eax
        movl %eax, sysenter_cs
        movw %ss, %ax
        movzwl %ax, %eax
        movl %eax, sysenter_ss
        movl %esp, sysenter_esp
        sysexit

back_to_kernel:
        cli
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl saved_esp, %esp
        CHECK user32.int80_saved_cs, int80_cs, $USER_CS
        CHECK user32.int80_stack_is_esp0, int80_top, $kernel_stack_top
        CHECK user32.irq_from_cpl3_taken, ipi_count, $1
        CHECK user32.irq_from_cpl3_vector, ipi_vector, $0x44
        CHECK user32.irq_saved_cs, ipi_cs, $USER_CS
        CHECK user32.irq_stack_is_esp0, ipi_top, $kernel_stack_top
        CHECK sysenter.cs, sysenter_cs, $0x08
        CHECK sysenter.ss, sysenter_ss, $0x10
        CHECK sysenter.esp, sysenter_esp, $kernel_stack_top-64
        CHECK sysenter.sysexit_cs, sysexit_cs, $USER_CS
        CHECK sysenter.sysexit_ss, sysexit_ss, $USER_DS
        CHECK sysenter.sysexit_esp, sysexit_esp, $user_stack_top-32
        call done
