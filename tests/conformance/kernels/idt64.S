# idt64.S - 64-bit IDT delivery (SDM vol. 3 6.14): frames, 16-byte stack alignment, interrupt
# vs trap gates, IST, #DE #UD #GP #PF, and #NP while delivering #PF (a #DF on IST1).
# A Multiboot kernel (assembled as x86-64 and converted to ELF32 for the loaders: the harness
# does that for kernels named *64): it enters long mode itself.
        .include "common32.inc"

        .set NO_ERROR, 0xEEEEEEEE
        .set CODE64, 0x18
        .set TSS_SEL, 0x20
        .set NOT_MAPPED, 0x40000000     # PDPT[1] is not present

        .macro CHECK64 name, got, want
        .section .rodata
9997:   .asciz "\name"
        .text
        pushq %rsi
        pushq %rax
        pushq %rdx
        movq \want, %rdx
        pushq %rdx
        movq \got, %rax
        popq %rdx
        leaq 9997b(%rip), %rsi
        call check64
        popq %rdx
        popq %rax
        popq %rsi
        .endm

        .section .rodata
        .p2align 3
gdt64:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08 code32
        .quad 0x00CF93000000FFFF        # 0x10 data
        .quad 0x00AF9B000000FFFF        # 0x18 code64
tss_descriptor:
        .quad 0                         # 0x20 TSS (filled at run time)
        .quad 0
gdt64_end:
gdt64_ptr:
        .word gdt64_end - gdt64 - 1
        .long gdt64
idt64_ptr:
        .word 256 * 16 - 1
        .quad idt64

        .data
        .p2align 3
gdt64_rw:                               # a writable copy (LTR sets the TSS busy bit)
        .skip 48

        .bss
        .p2align 12
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pd3:    .skip 4096
idt64:  .skip 256 * 16
tss64:  .skip 104
        .p2align 4
ist1_stack:
        .skip 4096
ist1_top:
stack64:
        .skip 8192
stack64_top:
ev_count:   .quad 0
ev_vector:  .quad 0
ev_error:   .quad 0
ev_rip:     .quad 0
ev_cs:      .quad 0
ev_if:      .quad 0
ev_rsp:     .quad 0
ev_top:     .quad 0
resume_rip: .quad 0

        .text
        .code32
        .globl main
main:
        # identity map: 0-1 GiB and 3-4 GiB with 2 MiB pages; 1-2 GiB not present
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax
        movl %eax, pd0(,%ecx,8)
        orl $0xC0000000, %eax
        movl %eax, pd3(,%ecx,8)
        incl %ecx
        cmpl $512, %ecx
        jb 1b
        movl $pd0 + 3, pdpt
        movl $pd3 + 3, pdpt + 24
        movl $pdpt + 3, pml4
        movl %cr4, %eax
        orl $(1 << 5), %eax             # PAE
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx
        rdmsr
        orl $(1 << 8), %eax             # LME
        wrmsr
        movl %cr0, %eax
        orl $0x80000000, %eax
        movl %eax, %cr0
        # the GDT with a 64-bit TSS descriptor (base tss64, limit 103, type 9)
        movl $gdt64, %esi
        movl $gdt64_rw, %edi
        movl $12, %ecx
        rep movsl
        movl $tss64, %eax
        movl %eax, %edx
        shll $16, %eax
        orl $103, %eax
        movl %eax, gdt64_rw + TSS_SEL
        movl %edx, %eax
        shrl $16, %eax
        andl $0xFF, %eax
        movl %edx, %ebx
        andl $0xFF000000, %ebx
        orl %ebx, %eax
        orl $0x8900, %eax
        movl %eax, gdt64_rw + TSS_SEL + 4
        movl $gdt64_rw, gdt64_ptr + 2
        lgdt gdt64_ptr
        ljmp $CODE64, $long_mode

        .code64
long_mode:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        leaq stack64_top(%rip), %rsp
        leaq ist1_top(%rip), %rax
        movq %rax, tss64 + 0x24(%rip)   # IST1
        movw $TSS_SEL, %ax
        ltr %ax
        call idt64_install
        lidt idt64_ptr(%rip)

        # --- INT3 with RSP 8 mod 16: trap (RIP after it), the frame aligned down to 16
        call reset
        subq $8, %rsp
        int3
1:      addq $8, %rsp
        CHECK64 idt64.int3_vector, ev_vector(%rip), $3
        leaq 1b(%rip), %rax
        CHECK64 idt64.int3_rip_after, ev_rip(%rip), %rax
        CHECK64 idt64.int3_cs, ev_cs(%rip), $CODE64
        movq ev_top(%rip), %rax
        andq $15, %rax
        CHECK64 idt64.frame_aligned_16, %rax, $0
        movq ev_rsp(%rip), %rax
        andq $15, %rax
        CHECK64 idt64.saved_rsp_unaligned, %rax, $8

        # --- #UD: a fault, RIP on the instruction
        call reset
        leaq 2f(%rip), %rax
        movq %rax, resume_rip(%rip)
1:      ud2
2:      CHECK64 idt64.ud_vector, ev_vector(%rip), $6
        leaq 1b(%rip), %rax
        CHECK64 idt64.ud_rip, ev_rip(%rip), %rax

        # --- #DE
        call reset
        leaq 2f(%rip), %rax
        movq %rax, resume_rip(%rip)
        xorl %ecx, %ecx
        movl $1, %eax
        xorl %edx, %edx
1:      divl %ecx
2:      CHECK64 idt64.de_vector, ev_vector(%rip), $0

        # --- #GP(0) on a non-canonical address
        call reset
        leaq 2f(%rip), %rax
        movq %rax, resume_rip(%rip)
        movabsq $0x8000000000000000, %rbx
1:      movq (%rbx), %rax
2:      CHECK64 idt64.gp_noncanonical_vector, ev_vector(%rip), $13
        CHECK64 idt64.gp_noncanonical_error, ev_error(%rip), $0

        # --- #PF: not present, read, supervisor: error 0, CR2 the address
        call reset
        leaq 2f(%rip), %rax
        movq %rax, resume_rip(%rip)
        movl $NOT_MAPPED + 8, %ebx
1:      movq (%rbx), %rax
2:      CHECK64 idt64.pf_vector, ev_vector(%rip), $14
        CHECK64 idt64.pf_error, ev_error(%rip), $0
        movq %cr2, %rax
        CHECK64 idt64.pf_cr2, %rax, $NOT_MAPPED + 8

        # --- interrupt gate clears IF, trap gate keeps it
        call reset
        sti
        int $0x80
        int $0x81
        cli
        CHECK64 idt64.trap_gate_keeps_if, ev_if(%rip), $0x200
        call reset
        sti
        int $0x80
        cli
        CHECK64 idt64.interrupt_gate_clears_if, ev_if(%rip), $0

        # --- IST: gate 0x82 names IST1: the frame is on the IST1 stack
        call reset
        int $0x82
        leaq ist1_top(%rip), %rax
        CHECK64 idt64.ist_stack, ev_top(%rip), %rax

        # --- #NP while delivering #PF (gate 14 not present): #DF(0), on IST1 (gate 8)
        call reset
        andb $0x7f, idt64 + 14 * 16 + 5(%rip)
        leaq 2f(%rip), %rax
        movq %rax, resume_rip(%rip)
        movl $NOT_MAPPED, %ebx
1:      movq (%rbx), %rax
2:      orb $0x80, idt64 + 14 * 16 + 5(%rip)
        CHECK64 idt64.df_vector, ev_vector(%rip), $8
        CHECK64 idt64.df_error, ev_error(%rip), $0
        CHECK64 idt64.df_count, ev_count(%rip), $1
        leaq ist1_top(%rip), %rax
        CHECK64 idt64.df_on_ist1, ev_top(%rip), %rax

        # --- an external interrupt (a self-IPI, vector 0x90, IST1 gate) with RSP 8 mod 16
        movl $0xFEE00000, %edi              # the LAPIC
        movl $0x1ff, 0xF0(%rdi)             # SVR: software-enabled
        call reset
        subq $8, %rsp
        movl $0, 0x310(%rdi)
        movl $0x40090, 0x300(%rdi)           # shorthand self, fixed, vector 0x90
        sti
        movl $1000000, %ecx
1:      cmpq $0, ev_count(%rip)
        jne 2f
        pause
        decl %ecx
        jnz 1b
2:      cli
        addq $8, %rsp
        movl $0, 0xB0(%rdi)                 # EOI
        CHECK64 idt64.external_vector, ev_vector(%rip), $0x90
        leaq ist1_top(%rip), %rax
        CHECK64 idt64.external_on_ist1, ev_top(%rip), %rax
        CHECK64 idt64.external_cs, ev_cs(%rip), $CODE64
        CHECK64 idt64.external_clears_if, ev_if(%rip), $0
        # --- the same on the current stack (gate 0x91, no IST): aligned down to 16
        call reset
        subq $8, %rsp
        movl $0x40091, 0x300(%rdi)
        sti
        movl $1000000, %ecx
1:      cmpq $0, ev_count(%rip)
        jne 2f
        pause
        decl %ecx
        jnz 1b
2:      cli
        addq $8, %rsp
        movl $0, 0xB0(%rdi)
        CHECK64 idt64.external_no_ist_vector, ev_vector(%rip), $0x91
        movq ev_top(%rip), %rax
        andq $15, %rax
        CHECK64 idt64.external_frame_aligned_16, %rax, $0
        movq ev_rsp(%rip), %rax
        andq $15, %rax
        CHECK64 idt64.external_saved_rsp, %rax, $8

        leaq done_text(%rip), %rsi
        call puts64
        xorl %eax, %eax
        outl %eax, $DEBUG_EXIT_PORT
1:      cli
        hlt
        jmp 1b

reset:
        movq $0, ev_count(%rip)
        movq $-1, ev_vector(%rip)
        movq $0, resume_rip(%rip)
        ret

# Gate stubs: push a dummy error code where the CPU pushes none, then the vector.
        .altmacro
        .macro stub64 vector
stub64_\vector:
        .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
        .else
        pushq $-1
        .endif
        pushq $\vector
        jmp recorder64
        .endm
        .set vec, 0
        .rept 256
        stub64 %vec
        .set vec, vec + 1
        .endr
        .macro stub64_addr vector
        .quad stub64_\vector
        .endm
        .section .rodata
        .p2align 3
stub64_table:
        .set vec, 0
        .rept 256
        stub64_addr %vec
        .set vec, vec + 1
        .endr
        .noaltmacro
        .text

# Stack: RFLAGS now, RBX, RAX, vector, error, RIP, CS, RFLAGS, RSP, SS.
recorder64:
        pushq %rax
        pushq %rbx
        pushfq
        incq ev_count(%rip)
        movq 24(%rsp), %rax
        movq %rax, ev_vector(%rip)
        movq 32(%rsp), %rax
        movq %rax, ev_error(%rip)
        movq 40(%rsp), %rax
        movq %rax, ev_rip(%rip)
        movq 48(%rsp), %rax
        movq %rax, ev_cs(%rip)
        movq (%rsp), %rax
        andq $0x200, %rax
        movq %rax, ev_if(%rip)
        movq 64(%rsp), %rax
        movq %rax, ev_rsp(%rip)
        leaq 80(%rsp), %rax
        movq %rax, ev_top(%rip)
        movq resume_rip(%rip), %rax
        testq %rax, %rax
        jz 1f
        movq %rax, 40(%rsp)
        movq $0, resume_rip(%rip)
1:      addq $8, %rsp
        popq %rbx
        popq %rax
        addq $16, %rsp
        iretq

# Interrupt gates (type 0xE) everywhere; 0x81 a trap gate (0xF); 0x82 and 8 on IST1.
idt64_install:
        movb $0xff, %al                 # 8259 inputs masked (see idt_install in conform.inc)
        outb %al, $0x21
        outb %al, $0xa1
        xorl %ecx, %ecx
        leaq idt64(%rip), %rdi
        leaq stub64_table(%rip), %rsi
1:      movq (%rsi,%rcx,8), %rax
        movq %rax, %rdx
        andq $0xFFFF, %rax
        orq $(CODE64 << 16), %rax
        movq %rdx, %rbx
        shrq $16, %rbx
        andq $0xFFFF, %rbx
        shlq $48, %rbx
        orq %rbx, %rax
        movq $0x8E, %rbx                # present, DPL 0, interrupt gate
        cmpl $0x81, %ecx
        jne 2f
        movq $0x8F, %rbx                # trap gate
2:      shlq $40, %rbx
        orq %rbx, %rax
        cmpl $0x82, %ecx
        je 3f
        cmpl $0x90, %ecx
        je 3f
        cmpl $8, %ecx
        jne 4f
3:      movq $1, %rbx
        shlq $32, %rbx
        orq %rbx, %rax                  # IST1
4:      movq %rcx, %rbx
        shlq $4, %rbx
        movq %rax, (%rdi,%rbx)
        shrq $32, %rdx
        movq %rdx, 8(%rdi,%rbx)
        incl %ecx
        cmpl $256, %ecx
        jb 1b
        ret

# 64-bit output: putc64 (%al), puts64 (%rsi), hex64 (%eax as 8 digits), check64.
putc64:
        pushq %rdx
        pushq %rax
        movw $COM1_LSR, %dx
1:      inb %dx, %al
        testb $LSR_THR_EMPTY, %al
        jz 1b
        popq %rax
        movw $COM1, %dx
        outb %al, %dx
        popq %rdx
        ret
puts64:
        pushq %rsi
        pushq %rax
1:      lodsb
        testb %al, %al
        jz 2f
        call putc64
        jmp 1b
2:      popq %rax
        popq %rsi
        ret
hex64:
        pushq %rdx
        pushq %rbx
        pushq %rcx
        pushq %rax
        movl %eax, %ebx
        movb $'0', %al
        call putc64
        movb $'x', %al
        call putc64
        movl $8, %ecx
1:      roll $4, %ebx
        movl %ebx, %eax
        andl $0xf, %eax
        leaq hexdigits64(%rip), %rdx
        movb (%rdx,%rax), %al
        call putc64
        decl %ecx
        jnz 1b
        popq %rax
        popq %rcx
        popq %rbx
        popq %rdx
        ret
# check64: %rsi name, %rax got, %rdx want (compared as 64 bits, printed as the low 32).
check64:
        pushq %rsi
        leaq check_text(%rip), %rsi
        call puts64
        movq (%rsp), %rsi
        call puts64
        cmpq %rdx, %rax
        jne 1f
        leaq ok_text(%rip), %rsi
        call puts64
        jmp 2f
1:      leaq fail_text(%rip), %rsi
        call puts64
        call hex64
        leaq want_text(%rip), %rsi
        call puts64
        pushq %rax
        movq %rdx, %rax
        call hex64
        popq %rax
2:      leaq crlf64(%rip), %rsi
        call puts64
        popq %rsi
        ret

        .section .rodata
check_text: .asciz "CHECK "
ok_text:    .asciz " ok"
fail_text:  .asciz " FAIL got="
want_text:  .asciz " want="
crlf64:     .asciz "\r\n"
done_text:  .asciz "DONE\r\n"
hexdigits64: .ascii "0123456789abcdef"
