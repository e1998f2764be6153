# gates.S - the IDT's gate types in 32-bit protected mode (SDM vol. 3 6.11, 6.12, 7.3): an
# interrupt gate clears IF, a trap gate keeps it (both push the EFLAGS of before); a task gate
# switches to the task its TSS names (TR, the back link to the old task, NT set) and IRET with
# NT set returns to the old task, after the INT.
        .include "common32.inc"
        .include "conform.inc"

        .set TSS_A, 0x18
        .set TSS_B, 0x20

        .section .rodata
        .p2align 3
gdt_template:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08 code
        .quad 0x00CF93000000FFFF        # 0x10 data
        .quad 0                         # 0x18 TSS A (this task; filled at run time)
        .quad 0                         # 0x20 TSS B (the task gate's)
gdt_end:

        .data
        .p2align 3
gdt_rw:
        .skip gdt_end - gdt_template
gdtr_rw:
        .word gdt_end - gdt_template - 1
        .long gdt_rw

        .bss
        .p2align 4
tss_a:  .skip 104
tss_b:  .skip 104
        .skip 4096
task_b_stack:
flags_in_handler:       .long 0
flags_pushed:           .long 0
task_tr:                .long 0
task_link:              .long 0
task_flags:             .long 0
task_returned:          .long 0

        .text
# flags_handler: records EFLAGS inside the handler and the EFLAGS the gate pushed.
flags_handler:
        pushl %eax
        pushfl
        popl %eax
        movl %eax, flags_in_handler
        movl 12(%esp), %eax
        movl %eax, flags_pushed
        popl %eax
        iret

# task B: records TR, its back link and NT, then IRETs to the task that called it.
task_entry:
        xorl %eax, %eax
        str %ax
        movl %eax, task_tr
        movzwl tss_b, %eax
        movl %eax, task_link
        pushfl
        popl %eax
        andl $0x4000, %eax
        movl %eax, task_flags
        iret
        jmp task_entry                  # a later call resumes here

# gate_set: %eax = vector, %edx = handler, %ebx = type byte (0x8E interrupt, 0x8F trap).
gate_set:
        pushl %ecx
        movl %edx, %ecx
        andl $0xFFFF, %ecx
        orl $0x00080000, %ecx
        movl %ecx, conf_idt(,%eax,8)
        andl $0xFFFF0000, %edx
        movl %ebx, %ecx
        shll $8, %ecx
        orl %ecx, %edx
        movl %edx, conf_idt+4(,%eax,8)
        popl %ecx
        ret

# tss_descriptor: %eax = TSS base, %edi = GDT slot: an available 32-bit TSS, limit 103.
tss_descriptor:
        pushl %eax
        pushl %edx
        movl %eax, %edx
        shll $16, %eax
        orl $103, %eax
        movl %eax, (%edi)
        movl %edx, %eax
        shrl $16, %eax
        andl $0xFF, %eax
        andl $0xFF000000, %edx
        orl %edx, %eax
        orl $0x8900, %eax
        movl %eax, 4(%edi)
        popl %edx
        popl %eax
        ret

        .globl main
main:
        call idt_install
        movb $0xff, %al
        outb %al, $0x21
        outb %al, $0xa1

        # --- interrupt gate: IF cleared in the handler, the pushed EFLAGS has IF
        movl $0x70, %eax
        movl $flags_handler, %edx
        movl $0x8E, %ebx
        call gate_set
        sti
        int $0x70
        cli
        movl flags_in_handler, %eax
        andl $0x200, %eax
        CHECK gate.interrupt_clears_if, %eax, $0
        movl flags_pushed, %eax
        andl $0x200, %eax
        CHECK gate.interrupt_pushes_if, %eax, $0x200

        # --- trap gate: IF kept
        movl $0x71, %eax
        movl $flags_handler, %edx
        movl $0x8F, %ebx
        call gate_set
        movl $0, flags_in_handler
        sti
        int $0x71
        cli
        movl flags_in_handler, %eax
        andl $0x200, %eax
        CHECK gate.trap_keeps_if, %eax, $0x200

        # --- task gate: a task switch to TSS B and back
        movl $gdt_template, %esi
        movl $gdt_rw, %edi
        movl $(gdt_end - gdt_template) / 4, %ecx
        rep movsl
        movl $tss_a, %eax
        movl $gdt_rw + TSS_A, %edi
        call tss_descriptor
        movl $tss_b, %eax
        movl $gdt_rw + TSS_B, %edi
        call tss_descriptor
        lgdt gdtr_rw
        movw $TSS_A, %ax
        ltr %ax
        movl %cr3, %eax
        movl %eax, tss_b + 0x1C
        movl $task_entry, tss_b + 0x20  # EIP
        movl $2, tss_b + 0x24           # EFLAGS
        movl $task_b_stack, tss_b + 0x38
        movl $0x10, %eax
        movl %eax, tss_b + 0x48         # ES
        movl $0x08, tss_b + 0x4C        # CS
        movl %eax, tss_b + 0x50         # SS
        movl %eax, tss_b + 0x54         # DS
        movl %eax, tss_b + 0x58         # FS
        movl %eax, tss_b + 0x5C         # GS
        movl $104 << 16, tss_b + 0x64   # no I/O bitmap
        movl $(TSS_B << 16), conf_idt + 0x72 * 8
        movl $0x8500, conf_idt + 0x72 * 8 + 4   # present, DPL 0, task gate
        int $0x72
        movl $1, task_returned
        xorl %eax, %eax
        str %ax
        CHECK gate.task_switched_tr, task_tr, $TSS_B
        CHECK gate.task_back_link, task_link, $TSS_A
        CHECK gate.task_nt_set, task_flags, $0x4000
        CHECK gate.task_iret_returns, task_returned, $1
        CHECK gate.task_tr_restored, %eax, $TSS_A
        pushfl
        popl %eax
        andl $0x4000, %eax
        CHECK gate.task_nt_clear_after, %eax, $0
        call done
