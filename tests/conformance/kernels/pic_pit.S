# pic_pit.S - the 8259 PIC and the 8254 PIT (Intel 8259A and 82C54 data sheets): IRQ 0 from PIT
# channel 0 (mode 2) arrives through the PIC, remapped to vector 0x20, one interrupt per EOI;
# OCW3 reads the IRR; a masked IRQ is not delivered; the counter counts down.
        .include "common32.inc"
        .include "conform.inc"

        .text
        .globl main
main:
        call idt_install
        movl $0, eoi_vectors
        # ICW1-4: edge, cascade, vectors 0x20 / 0x28, 8086 mode; mask all but IRQ 0
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
        movb $0xFE, %al
        outb %al, $0x21
        movb $0xFF, %al
        outb %al, $0xA1
        # PIT channel 0, lobyte/hibyte, mode 2, divisor 1193 (1 kHz)
        movb $0x34, %al
        outb %al, $0x43
        movw $1193, %ax
        outb %al, $0x40
        movb %ah, %al
        outb %al, $0x40

        # --- three IRQ 0s, one per EOI, at vector 0x20
        call ev_reset
        movl $3, %ebx
2:      sti
        movl ev_count, %edx
        incl %edx
        movl %edx, %ecx
        call wait_events
        cli
        movb $0x20, %al
        outb %al, $0x20                 # non-specific EOI
        decl %ebx
        jnz 2b
        CHECK pic.irq0_three_ticks, ev_count, $3
        CHECK pic.irq0_vector, ev_log, $0x20
        CHECK pic.irq0_vector_third, ev_log+8, $0x20

        # --- with IF=0 the request waits in the IRR (OCW3: read IRR)
        movb $0x0A, %al
        outb %al, $0x20
        movl $1000000, %ecx
1:      inb $0x20, %al
        testb $1, %al
        jnz 2f
        decl %ecx
        jnz 1b
2:      movzbl %al, %eax
        andl $1, %eax
        CHECK pic.irr_holds_irq0, %eax, $1
        # --- masked: nothing arrives, even with IF=1
        movb $0xFF, %al
        outb %al, $0x21
        call ev_reset
        sti
        movl $1, %ecx
        call wait_events
        cli
        CHECK pic.masked_irq_not_delivered, ev_count, $0
        # --- the PIT counter counts down between two latches
        movb $0x00, %al
        outb %al, $0x43                 # latch channel 0
        inb $0x40, %al
        movb %al, %bl
        inb $0x40, %al
        movb %al, %bh
        movl $20000, %ecx
1:      decl %ecx
        jnz 1b
        movb $0x00, %al
        outb %al, $0x43
        inb $0x40, %al
        movb %al, %dl
        inb $0x40, %al
        movb %al, %dh
        xorl %eax, %eax
        cmpw %dx, %bx
        setne %al
        CHECK pit.counter_moves, %eax, $1
        movzwl %bx, %eax
        xorl %ecx, %ecx
        cmpl $1193, %eax
        setb %cl
        CHECK pit.counter_below_divisor, %ecx, $1
        call done
