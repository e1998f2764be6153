# multiboot_low.S - a Multiboot kernel linked at 0x8000 (where test kernels put real-mode
# trampolines), with a .bss reaching past 0x38000: the loader must place the Multiboot
# information and command line where the image is not (Multiboot 0.6.96 section 3.2).
# Linked with multiboot_low.ld.
        .include "common32.inc"
        .include "conform.inc"

        .bss
        .skip 0x30000                   # the image covers 0x8000 .. past 0x38000

        .text
        .globl main
main:
        movl mb_info, %ebx
        testl %ebx, %ebx
        setnz %al
        movzbl %al, %eax
        CHECK multiboot.magic_and_info, %eax, $1
        # the information structure lies outside the image
        movl $0, %eax
        cmpl $_start, %ebx
        jb 1f
        cmpl $__bss_end, %ebx
        jae 1f
        movl $1, %eax
1:      CHECK multiboot.info_outside_image, %eax, $0
        # an information structure inside the image was cleared with its .bss: its fields
        # cannot be checked (each reports 0xbadbad)
        testl %eax, %eax
        jz 2f
        CHECK multiboot.info_flags, $0xbadbad, $0x45
        CHECK multiboot.mem_lower, $0xbadbad, $639
        CHECK multiboot.cmdline_outside_image, $0xbadbad, $0
        jmp 3f
2:
        # flags: memory (0), command line (2), memory map (6)
        movl (%ebx), %eax
        andl $0x45, %eax
        CHECK multiboot.info_flags, %eax, $0x45
        # mem_lower: 639 KiB of low RAM in both loaders
        movl 4(%ebx), %eax
        CHECK multiboot.mem_lower, %eax, $639
        # the command line lies outside the image too
        call cmdline_ptr
        movl $0, %ecx
        cmpl $_start, %eax
        jb 1f
        cmpl $__bss_end, %eax
        jae 1f
        movl $1, %ecx
1:      CHECK multiboot.cmdline_outside_image, %ecx, $0
3:
        # code at 0x8000 runs: we are here
        movl $main, %eax
        andl $0xFFFF0000, %eax
        CHECK multiboot.running_below_64k, %eax, $0
        call done
