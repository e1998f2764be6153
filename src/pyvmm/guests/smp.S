# smp - multiprocessor bring-up test guest (Multiboot ELF32).
#
# Command line: "cpus=N" (absent or 0 means 1).  Output on COM1:
#   smp: bsp apic <id>
#   smp: ap apic <id> up                (once per AP, lines never interleave)
#   smp: <count> cpus up                -> debug exit with value <count>
# where <count> = 1 + APs that checked in (N in a good run; seen as soon as at
# least N-1 APs are up).  If fewer than N-1 APs check in within ~2^33 TSC
# cycles (a few seconds on real hardware, also under QEMU TCG whose TSC
# follows the host's): "smp: timeout" and debug exit 0x7f.
#
# Bring-up: the BSP copies the 16-bit trampoline below to physical 0x8000
# (pyvmm's loader accepts nothing below 1 MiB outside [0x30000, 0x9fc00), so it
# cannot be linked there), then sends INIT and twice SIPI with vector 0x08 to
# all-excluding-self through the xAPIC ICR.  Each AP starts at 0800:0000 in
# real mode, loads the trampoline's GDT, enters protected mode with a far jump
# straight into ap_entry32 (in the kernel image), takes a stack, prints under
# a spinlock and atomically increments ap_count, then halts forever.

        .include "common32.inc"

        .set LAPIC_ID, 0xFEE00020
        .set LAPIC_ICR_LOW, 0xFEE00300
        .set LAPIC_ICR_HIGH, 0xFEE00310
        .set ICR_INIT_ALL_BUT_SELF, 0x000C4500   # INIT, level assert, shorthand 11b
        .set ICR_SIPI_ALL_BUT_SELF, 0x000C4600   # | vector (page number of the entry)
        .set ICR_DELIVERY_PENDING, 0x1000
        .set TRAMP_BASE, 0x8000
        .set SIPI_VECTOR, TRAMP_BASE >> 12
        .set AP_STACKS, 64                       # power of two
        .set AP_STACK_SIZE, 1024
        .set TIMEOUT_TSC_HIGH, 2                 # give up after 2 * 2^32 TSC cycles
        .set IPI_DELAY, 5000

        .bss
        .p2align 4
ap_stacks:
        .skip AP_STACKS * AP_STACK_SIZE
        .p2align 2
ap_count:       .long 0         # APs that finished printing
ap_stack_next:  .long 0         # next free AP stack
print_lock:     .long 0
expected_aps:   .long 0

        .text
        .code32
        .globl main
main:
        movl $1, %eax                   # default: just the BSP
        movl $key_cpus, %esi
        call cmdline_get_uint
        testl %eax, %eax
        jnz 1f
        movl $1, %eax
1:      decl %eax
        movl %eax, expected_aps

        movl $msg_bsp, %esi
        call serial_puts
        movl LAPIC_ID, %eax
        shrl $24, %eax
        call print_dec
        call serial_newline

        cmpl $0, expected_aps
        je .Lwait

        # Put the trampoline where the SIPI vector points.
        movl $tramp_start, %esi
        movl $TRAMP_BASE, %edi
        movl $(tramp_end - tramp_start), %ecx
        rep movsb

        movl $ICR_INIT_ALL_BUT_SELF, %eax
        call send_ipi
        call ipi_delay
        movl $(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
        call send_ipi
        call ipi_delay
        movl $(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
        call send_ipi

.Lwait:
        rdtsc
        movl %eax, %esi                 # %edi:%esi = start TSC
        movl %edx, %edi
.Lwait_loop:
        movl ap_count, %eax
        cmpl expected_aps, %eax
        jae .Lall_up
        pause
        rdtsc
        subl %esi, %eax
        sbbl %edi, %edx
        cmpl $TIMEOUT_TSC_HIGH, %edx
        jb .Lwait_loop
        call spin_lock
        movl $msg_timeout, %esi
        call serial_puts
        call spin_unlock
        movl $0x7f, %eax
        call debug_exit
        jmp halt_forever

.Lall_up:
        call spin_lock
        movl $msg_total1, %esi
        call serial_puts
        movl ap_count, %ebx
        incl %ebx                       # + the BSP
        movl %ebx, %eax
        call print_dec
        movl $msg_total2, %esi
        call serial_puts
        call spin_unlock
        movl %ebx, %eax
        call debug_exit
        jmp halt_forever

# send_ipi: write %eax to ICR low (ICR high is ignored with a shorthand) and
# wait, bounded, for the delivery-status bit to clear.
send_ipi:
        pushl %ecx
        movl $0, LAPIC_ICR_HIGH
        movl %eax, LAPIC_ICR_LOW
        movl $1000, %ecx
1:      testl $ICR_DELIVERY_PENDING, LAPIC_ICR_LOW
        jz 2f
        pause
        decl %ecx
        jnz 1b
2:      popl %ecx
        ret

# ipi_delay: a token pause between INIT and SIPI (real hardware wants 10 ms;
# virtual CPUs do not, and a long loop would crawl under emulation).
ipi_delay:
        pushl %ecx
        movl $IPI_DELAY, %ecx
1:      pause
        decl %ecx
        jnz 1b
        popl %ecx
        ret

spin_lock:
        pushl %eax
1:      movl $1, %eax
        xchgl %eax, print_lock          # xchg with memory is always locked
        testl %eax, %eax
        jz 3f
2:      pause                           # wait read-only until it looks free
        cmpl $0, print_lock
        jne 2b
        jmp 1b
3:      popl %eax
        ret

spin_unlock:
        movl $0, print_lock             # x86 stores are release-ordered
        ret

# 32-bit AP entry, reached by the trampoline's far jump (CS = 0x08 from the
# trampoline GDT, which has the same layout as the BSP's).
ap_entry32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss
        movl $1, %eax
        lock xaddl %eax, ap_stack_next  # claim a stack slot
        andl $(AP_STACKS - 1), %eax
        incl %eax
        imull $AP_STACK_SIZE, %eax, %eax
        addl $ap_stacks, %eax
        movl %eax, %esp                 # top of the claimed slot
        cld
        movl LAPIC_ID, %ebx
        shrl $24, %ebx
        call spin_lock
        movl $msg_ap1, %esi
        call serial_puts
        movl %ebx, %eax
        call print_dec
        movl $msg_ap2, %esi
        call serial_puts
        call spin_unlock
        lock incl ap_count
        jmp halt_forever

# The AP trampoline.  It runs at TRAMP_BASE with CS = TRAMP_BASE >> 4 and
# IP = 0, so addresses inside it are offsets from tramp_start; only the
# far jump target is an absolute (linked) address.
        .p2align 4
tramp_start:
        .code16
        cli
        # 32-bit operand size so all 32 bits of the GDT base are loaded; the
        # base in tramp_gdtr is the linear address of the copied GDT.
        lgdtl %cs:(tramp_gdtr - tramp_start)
        movl %cr0, %eax
        orl $1, %eax                    # PE
        movl %eax, %cr0
        ljmpl $0x08, $ap_entry32
        .p2align 3
tramp_gdt:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08: 32-bit code
        .quad 0x00CF93000000FFFF        # 0x10: data
tramp_gdt_end:
tramp_gdtr:
        .word tramp_gdt_end - tramp_gdt - 1
        .long TRAMP_BASE + (tramp_gdt - tramp_start)
tramp_end:
        .code32

        .section .rodata
key_cpus:       .asciz "cpus"
msg_bsp:        .asciz "smp: bsp apic "
msg_ap1:        .asciz "smp: ap apic "
msg_ap2:        .asciz " up\r\n"
msg_total1:     .asciz "smp: "
msg_total2:     .asciz " cpus up\r\n"
msg_timeout:    .asciz "smp: timeout\r\n"
