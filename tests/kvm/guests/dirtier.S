# dirtier - writes every page of a block of guest RAM over and over, as fast as it can: a
# guest whose memory changes faster than a slow migration stream can follow. Each pass
# stores the pass number at the start of each page and then in PASSES. pyvmm ELF64 entry.
#   0x300000 PASSES  passes completed
#   0x300008 PAGES   pages in the block (0: the default, 256)
#   0x400000         the block

        .set PASSES, 0x300000
        .set PAGES, 0x300008
        .set BLOCK, 0x400000

        .text
        .code64
        .globl _start
_start:
        cli
        xorl %eax, %eax
pass:
        incq %rax
        movq PAGES, %rcx
        testq %rcx, %rcx
        jnz 1f
        movl $256, %ecx
1:      movl $BLOCK, %edi
page:
        movq %rax, (%rdi)
        addq $4096, %rdi
        decq %rcx
        jnz page
        movq %rax, PASSES
        jmp pass
