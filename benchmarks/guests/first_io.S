# first_io - the smallest PVH guest: says it started, then leaves (benchmarks/start_up.py).
#
# A 32-bit ELF with a XEN_ELFNOTE_PHYS32_ENTRY note, which both pyvmm and QEMU boot directly
# (PVH: protected mode, paging off). Its first instructions write 0x01 to port 0x610 (the
# benchmarks' "started" port), then 0 to the debug-exit port 0xf4: status (0 << 1) | 1.

        .section .note.Xen, "a"
        .balign 4
        .long 4                 # name size: "Xen\0"
        .long 4                 # descriptor size: a 32-bit entry
        .long 18                # XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .long _start

        .text
        .code32
        .globl _start
_start:
        movw $0x610, %dx
        movb $1, %al
        outb %al, %dx
        movw $0xf4, %dx
        xorl %eax, %eax
        outl %eax, %dx
1:      cli
        hlt
        jmp 1b
