# pagewalk - page tables of its own for the memory inspector's tests (pyvmm mem translate/read),
# then counts for ever through a 4 KiB page in the upper half of the address space.
# pyvmm ELF64 entry: the low 4 GiB identity-mapped by 2 MiB pages. This guest makes a new PML4
# at 0x310000 whose entry 0 is the entry's own (the low 4 GiB as before) and whose entry 256
# leads, through a PDPT (0x311000), a PD (0x312000) and a PT (0x313000) of its own, to one
# 4 KiB page: GVA 0xffff800000005000 -> GPA 0x305000, writable, supervisor, no-execute.
# GVA 0xffff800000006000 (PT entry 6) is not present. It then counts at GVA
# 0xffff800000005000, so the u64 at GPA 0x305000 grows.

        .set EFER, 0xc0000080
        .set NEW_PML4, 0x310000
        .set PDPT, 0x311000
        .set PD, 0x312000
        .set PT, 0x313000
        .set PAGE, 0x305000
        .set P_RW, 0x3

        .text
        .code64
        .globl _start
_start:
        cli
        movl $EFER, %ecx                # NXE on: bit 63 of an entry means no-execute
        rdmsr
        orl $(1 << 11), %eax
        wrmsr
        movl $NEW_PML4, %edi            # the four tables, zeroed
        movl $(4 * 4096 / 8), %ecx
        xorl %eax, %eax
        rep stosq
        movq %cr3, %rsi
        movq (%rsi), %rax               # the low 4 GiB, as the entry mapped them
        movq %rax, NEW_PML4
        movq $(PDPT | P_RW), %rax
        movq %rax, NEW_PML4 + 256 * 8
        movq $(PD | P_RW), %rax
        movq %rax, PDPT
        movq $(PT | P_RW), %rax
        movq %rax, PD
        movabsq $(PAGE | P_RW | (1 << 63)), %rax
        movq %rax, PT + 5 * 8
        movq $NEW_PML4, %rax
        movq %rax, %cr3
        movabsq $0xffff800000005000, %rbx
count:
        incq (%rbx)
        jmp count
