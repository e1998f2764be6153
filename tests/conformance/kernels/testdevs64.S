# testdevs64.S - the devices QEMU's test kernels use (QEMU docs/specs/fw_cfg.rst, pc-testdev):
# fw_cfg's signature, ID, CPU count and RAM size (the harness runs 1 vCPU, 64 MiB); the ISA
# test device's port latch (whole, partial and unaligned accesses) and its IRQ lines (IRQ 5
# raised through the 8259 PIC arrives at vector 0x25, once per edge; lowered, nothing more).
# pyvmm offers them with --test-devices, QEMU with -device pc-testdev (fw_cfg is always there).
        .include "common32.inc"
        .include "conform64.inc"

        .set FW_CFG_SEL, 0x510
        .set FW_CFG_DATA, 0x511
        .set LATCH, 0xE0
        .set LATCH_BYTES, 0xE8
        .set IRQ_PORT, 0x2000

        .text
        .code64
# fw_read: %ax key, %ecx bytes (at most 8): %rax = the first %ecx bytes of the item, little endian.
fw_read:
        pushq %rdx
        pushq %rbx
        pushq %rcx
        pushq %r8
        movw $FW_CFG_SEL, %dx
        outw %ax, %dx
        movw $FW_CFG_DATA, %dx
        xorl %ebx, %ebx
        leal (,%ecx,8), %r8d            # bits to read
        xorl %ecx, %ecx
1:      cmpl %r8d, %ecx
        jae 2f
        inb %dx, %al
        movzbq %al, %rax
        shlq %cl, %rax
        orq %rax, %rbx
        addl $8, %ecx
        jmp 1b
2:      movq %rbx, %rax
        popq %r8
        popq %rcx
        popq %rbx
        popq %rdx
        ret

        .globl main64
main64:
        # --- fw_cfg
        movw $0, %ax
        movl $4, %ecx
        call fw_read
        CHECK64 fwcfg.signature, %rax, $0x554D4551        # "QEMU"
        movw $1, %ax
        movl $4, %ecx
        call fw_read
        andq $1, %rax
        CHECK64 fwcfg.id_traditional, %rax, $1
        movw $5, %ax
        movl $2, %ecx
        call fw_read
        CHECK64 fwcfg.cpu_count, %rax, $1
        movw $3, %ax
        movl $8, %ecx
        call fw_read
        CHECK64 fwcfg.ram_size, %rax, $(64 << 20)
        movw $0, %ax                    # reselecting rewinds
        movl $1, %ecx
        call fw_read
        movw $0, %ax
        movl $2, %ecx
        call fw_read
        CHECK64 fwcfg.select_rewinds, %rax, $0x4551

        # --- the port latch
        movl $0x12345678, %eax
        outl %eax, $LATCH
        inl $LATCH, %eax
        CHECK64 testdev.latch_dword, %rax, $0x12345678
        movb $0xAA, %al
        outb %al, $LATCH + 1
        inl $LATCH, %eax
        CHECK64 testdev.latch_byte_write, %rax, $0x1234AA78
        xorl %eax, %eax
        inw $LATCH + 2, %ax
        CHECK64 testdev.latch_word_read, %rax, $0x1234
        movw $0x0201, %ax
        outw %ax, $LATCH_BYTES + 2
        inl $LATCH_BYTES, %eax
        CHECK64 testdev.latch_byte_window, %rax, $0x0201AA78

        # --- IRQ 5 through the PIC (ICW1-4: edge, vectors 0x20/0x28; only IRQ 5 unmasked)
        movb $0x11, %al
        outb %al, $0x20
        outb %al, $0xA0
        movb $0x20, %al
        outb %al, $0x21
        movb $0x28, %al
        outb %al, $0xA1
        movb $0x04, %al
        outb %al, $0x21
        movb $0x02, %al
        outb %al, $0xA1
        movb $0x01, %al
        outb %al, $0x21
        outb %al, $0xA1
        movb $0xDF, %al
        outb %al, $0x21
        movb $0xFF, %al
        outb %al, $0xA1
        call ev_reset64
        movw $IRQ_PORT + 5, %dx
        movb $1, %al
        outb %al, %dx
        sti
        call wait_event64
        cli
        CHECK64 testdev.irq5_delivered, ev_count(%rip), $1
        CHECK64 testdev.irq5_vector, ev_vector(%rip), $0x25
        movw $IRQ_PORT + 5, %dx
        movb $0, %al
        outb %al, %dx
        movb $0x20, %al
        outb %al, $0x20                 # EOI with the line low: nothing more
        sti
        call wait_event64
        cli
        CHECK64 testdev.irq5_lowered_quiet, ev_count(%rip), $1
        movw $IRQ_PORT + 5, %dx         # a new edge: a second interrupt
        movb $1, %al
        outb %al, %dx
        sti
        movq $2, %rcx
        call wait_events64
        cli
        CHECK64 testdev.irq5_second_edge, ev_count(%rip), $2
        movw $IRQ_PORT + 5, %dx
        movb $0, %al
        outb %al, %dx
        movb $0x20, %al
        outb %al, $0x20
        ret

# wait_event64: spin (IF as the caller set it) until ev_count >= 1 or long enough;
# wait_events64: until ev_count >= %rcx.
wait_event64:
        pushq %rcx
        movq $1, %rcx
        call wait_events64
        popq %rcx
        ret
wait_events64:
        pushq %rax
        movl $2000000, %eax
1:      cmpq %rcx, ev_count(%rip)
        jae 2f
        pause
        decl %eax
        jnz 1b
2:      popq %rax
        ret
