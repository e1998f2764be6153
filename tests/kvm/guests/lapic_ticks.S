# lapic_ticks - counts LAPIC timer interrupts in memory (tests that a timer keeps ticking across
# a restore, also on the other accelerator; Multiboot ELF32). Fixed addresses (host-visible):
#   0x300000 TICKS   u32, incremented by every timer interrupt
#   0x300008 PERIOD  u32, the timer's initial count, written by the host before the start
# The LAPIC timer runs periodic at vector 0x40, divide by 1; the guest idles in sti; hlt.

        .include "common32.inc"

        .set LAPIC_EOI, 0xfee000b0
        .set LAPIC_SVR, 0xfee000f0
        .set LAPIC_LVT_TIMER, 0xfee00320
        .set LAPIC_TIMER_INITIAL, 0xfee00380
        .set LAPIC_TIMER_DIVIDE, 0xfee003e0
        .set TIMER_PERIODIC, 0x20000
        .set TIMER_VECTOR, 0x40
        .set TICKS, 0x300000
        .set PERIOD, 0x300008

        .text
        .code32
        .globl main
main:
        movl $timer_interrupt, %eax     # a 32-bit interrupt gate for TIMER_VECTOR
        movw %ax, idt + TIMER_VECTOR * 8
        movw $0x08, idt + TIMER_VECTOR * 8 + 2
        movw $0x8e00, idt + TIMER_VECTOR * 8 + 4
        shrl $16, %eax
        movw %ax, idt + TIMER_VECTOR * 8 + 6
        lidt idtr
        movl $0x1ff, LAPIC_SVR
        movl $0xb, LAPIC_TIMER_DIVIDE
        movl $(TIMER_VECTOR | TIMER_PERIODIC), LAPIC_LVT_TIMER
        movl PERIOD, %eax
        movl %eax, LAPIC_TIMER_INITIAL
        movl $idle_stack_top, %esp
idle:
        sti
        hlt
        jmp idle

# No iret (a nested KVM that emulates CPL0 code cannot emulate a protected-mode iret): the
# handler drops its frame and goes back to idling.
timer_interrupt:
        incl TICKS
        movl $0, LAPIC_EOI
        movl $idle_stack_top, %esp
        jmp idle

        .section .rodata
        .p2align 3
idtr:
        .word 256 * 8 - 1
        .long idt

        .bss
        .p2align 3
idt:
        .skip 256 * 8
        .p2align 4
        .skip 1024
idle_stack_top:
