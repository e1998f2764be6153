# faults - raises exceptions on purpose and prints what the handler observed
# (pyvmm ELF64 entry: long mode at CPL0, CS = 0x10, DS/SS = 0x18, pyvmm's
# identity map of the low 4 GiB, interrupts off; not QEMU-bootable).
#
# The guest installs its own GDT (kernel/user code and data, a 64-bit TSS with
# RSP0 and IST1), IDT (vectors 0-31, and 0x80 with DPL 3) and 4-level page
# tables, sets CR0.WP, EFER.NXE and EFER.SCE, then runs these scenarios in
# order, printing one line each on COM1 (two for int80 and syscall):
#
#   de, ud, bp, gp_sel, gp_noncanon, pf_read_np, pf_write_ro, pf_write_np,
#   pf_user_sup, pf_rsvd, pf_nx, int80, syscall, double, then "triple next"
#   and a triple fault (pyvmm exits with status 4).
#
# Exception line (all numbers hex):
#   fault: <name> vec=VV err=EEEE|---- cr2=<CR2> rip=+<frame RIP - fault insn>
#          rsp=+<frame RSP - RSP at the fault> cs=<frame CS> ss=<frame SS>
#          cpl_from=<frame CS & 3> stack=same|rsp0|ist1|other
#   "err=----": the stub of a vector without an error code; "stack": where the
#   CPU put the frame (the interrupted stack aligned down to 16, TSS.RSP0 or
#   TSS.IST1).  CR2 is zeroed before every scenario.
# #DF line: vec, err, the page of CR2 and the stack (its saved CS:RIP are
# undefined per the SDM, so they are not printed).
# User-mode "back" line (int 0x80 with EAX=2 after returning to CPL3):
#   fault: <name> back rip=+<frame RIP - that int> rsp=+.. cs=.. ss=..
#          rflags=<frame RFLAGS> rbx=<CS as read by the user code>
# SYSCALL line (printed by the LSTAR handler):
#   fault: syscall rcx=+<RCX - syscall insn> r11=<R11> rflags=<RFLAGS in the
#          handler> cs=<CS> ss=<SS> rsp=+<RSP - user RSP>
# A scenario that does not fault prints "fault: <name> none".
#
# Memory: PD[0] maps 0-2 MiB with a 2 MiB page (U/S=1, R/W=1; the image lives
# at 1 MiB), PD[1] a page table for 2-4 MiB with:
#   0x200000 not present        0x201000 read-only (U/S=1)
#   0x202000 supervisor-only    0x203000 supervisor, execute-disable
# PML4[1] (linear 0x8000000000) has PS set: a reserved bit in a PML4E.
# Everything else is unmapped.  No output from CPL3 (a nested KVM may refuse
# port I/O at CPL3): user code reports through int 0x80 (EAX=2 back, EAX=3
# "none").  Kernel code is straight-line apart from the printing.

        .set COM1, 0x3f8
        .set COM1_LSR, COM1 + 5
        .set LSR_THR_EMPTY, 0x20

        .set KCODE, 0x10
        .set KDATA, 0x18
        .set USER32_BASE, 0x20          # STAR[63:48]: SYSRET -> CS 0x33, SS 0x2b
        .set UDATA, 0x28 | 3
        .set UCODE, 0x30 | 3
        .set TSS_SEL, 0x38
        .set BAD_SEL, 0x0ffb            # beyond the GDT limit -> #GP(0x0ff8)

        .set NP_PAGE, 0x200000
        .set RO_PAGE, 0x201000
        .set SUP_PAGE, 0x202000
        .set NX_PAGE, 0x203000
        .set RSVD_ADDR, 0x8000000000
        .set NONCANON, 0x8000000000000000

        .set MSR_EFER, 0xc0000080
        .set MSR_STAR, 0xc0000081
        .set MSR_LSTAR, 0xc0000082
        .set MSR_FMASK, 0xc0000084
        .set EFER_SCE, 1 << 0
        .set EFER_NXE, 1 << 11
        .set CR0_WP, 1 << 16
        .set SYSCALL_FMASK, 0x400       # DF: cleared on SYSCALL, CF is kept
        .set SYSRET_R11, 0xc7           # SF ZF PF CF + bit 1

        # offsets in the handler's frame (%rbp after the 15 GPR pushes)
        .set R_RBX, 104
        .set R_RAX, 112
        .set F_VEC, 120                 # vector | 0x100 if the CPU pushed an error code
        .set F_ERR, 128
        .set F_RIP, 136
        .set F_CS, 144
        .set F_RFLAGS, 152
        .set F_RSP, 160
        .set F_SS, 168
        .set F_TOP, 176                 # where the CPU started pushing

        .bss
        .p2align 12
pml4:   .skip 4096
pdpt:   .skip 4096
pdir:   .skip 4096
ptab:   .skip 4096
idt:    .skip 0x81 * 16
        .p2align 4
        .skip 4096
kstack_top:
        .skip 4096
rsp0_top:
        .skip 4096
ist1_top:
        .skip 4096
ustack_top:
        .p2align 4
tss:    .skip 104
        .p2align 3
scen_name:  .skip 8
fault_ip:   .skip 8
back_ip:    .skip 8
recover_ip: .skip 8
exp_rsp:    .skip 8
sc_ursp:    .skip 8
sc_rcx:     .skip 8
sc_r11:     .skip 8
sc_rflags:  .skip 8

        .data
        .p2align 3
# Accessed bits preset; the TSS descriptor is filled in at run time.
gdt:
        .quad 0
        .quad 0
        .quad 0x00AF9B000000FFFF        # 0x10 kernel code, 64-bit
        .quad 0x00CF93000000FFFF        # 0x18 kernel data
        .quad 0x00CFFB000000FFFF        # 0x20 user code, 32-bit (SYSRET layout)
        .quad 0x00CFF3000000FFFF        # 0x28 user data
        .quad 0x00AFFB000000FFFF        # 0x30 user code, 64-bit
        .quad 0, 0                      # 0x38 TSS (16 bytes)
gdt_end:

        .section .rodata
        .p2align 3
gdtr:   .word gdt_end - gdt - 1
        .quad gdt
        .p2align 3
idtr:   .word 0x81 * 16 - 1
        .quad idt
        .p2align 3
null_idtr:
        .word 0
        .quad 0
isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad isr_\v
        .endr
hexdigits:  .ascii "0123456789abcdef"

n_de:       .asciz "de"
n_ud:       .asciz "ud"
n_bp:       .asciz "bp"
n_gpsel:    .asciz "gp_sel"
n_gpnc:     .asciz "gp_noncanon"
n_pfnp:     .asciz "pf_read_np"
n_pfro:     .asciz "pf_write_ro"
n_pfwnp:    .asciz "pf_write_np"
n_pfuser:   .asciz "pf_user_sup"
n_pfrsvd:   .asciz "pf_rsvd"
n_pfnx:     .asciz "pf_nx"
n_int80:    .asciz "int80"
n_syscall:  .asciz "syscall"
n_double:   .asciz "double"

s_fault:    .asciz "fault: "
s_vec:      .asciz " vec="
s_err:      .asciz " err="
s_noerr:    .asciz "----"
s_cr2:      .asciz " cr2="
s_cr2page:  .asciz " cr2page="
s_rip:      .asciz " rip=+"
s_rsp:      .asciz " rsp=+"
s_cs:       .asciz " cs="
s_ss:       .asciz " ss="
s_cpl:      .asciz " cpl_from="
s_stack:    .asciz " stack="
s_same:     .asciz "same"
s_rsp0:     .asciz "rsp0"
s_ist1:     .asciz "ist1"
s_other:    .asciz "other"
s_back:     .asciz " back"
s_rflags:   .asciz " rflags="
s_rbx:      .asciz " rbx="
s_rcx:      .asciz " rcx=+"
s_r11:      .asciz " r11="
s_none:     .asciz " none"
s_eol:      .asciz "\r\n"
s_triple:   .asciz "fault: triple next\r\n"

# --- macros -----------------------------------------------------------------

        .macro PUTS str
        leaq \str(%rip), %rsi
        call puts
        .endm

        # print the value of \src (register or memory) as \digits hex digits
        .macro HEX src, digits
        movq \src, %rbx
        movl $\digits, %r8d
        call puthex
        .endm

        # name, faulting instruction, recovery address, RSP at the fault,
        # instruction the user code returns through (int 0x80, EAX=2)
        .macro SCEN name, fault, resume, rsp=kstack_top, back=0
        movq $\name, scen_name(%rip)
        movq $\fault, fault_ip(%rip)
        movq $\resume, recover_ip(%rip)
        movq $\rsp, exp_rsp(%rip)
        movq $\back, back_ip(%rip)
        xorl %eax, %eax
        movq %rax, %cr2
        .endm

        .macro STUB v
        .p2align 4
isr_\v:
        .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        pushq $(\v | 0x100)             # the CPU pushed an error code
        .else
        pushq $0
        pushq $\v
        .endif
        jmp common
        .endm

# --- boot -------------------------------------------------------------------

        .text
        .code64
        .globl _start
_start:
        cli
        cld
        leaq kstack_top(%rip), %rsp

        # EFER.NXE before any XD bit is in use; SCE for SYSCALL
        movl $MSR_EFER, %ecx
        rdmsr
        orl $(EFER_SCE | EFER_NXE), %eax
        wrmsr

        # page tables
        leaq pdpt(%rip), %rax
        orq $7, %rax
        movq %rax, pml4(%rip)
        orq $0x80, %rax                 # PS in a PML4E: reserved
        movq %rax, pml4+8(%rip)
        leaq pdir(%rip), %rax
        orq $7, %rax
        movq %rax, pdpt(%rip)
        movq $0x87, pdir(%rip)          # 0-2 MiB: 2 MiB page, P RW US
        leaq ptab(%rip), %rax
        orq $7, %rax
        movq %rax, pdir+8(%rip)
        movq $(RO_PAGE | 5), ptab+8(%rip)       # P US (read-only)
        movq $(SUP_PAGE | 3), ptab+16(%rip)     # P RW (supervisor)
        movabsq $(NX_PAGE | 3 | (1 << 63)), %rax
        movq %rax, ptab+24(%rip)                # P RW XD (supervisor)
        leaq pml4(%rip), %rax
        movq %rax, %cr3
        movq %cr0, %rax
        orl $CR0_WP, %eax
        movq %rax, %cr0

        # GDT, segments
        lgdt gdtr(%rip)
        pushq $KCODE
        leaq 1f(%rip), %rax
        pushq %rax
        lretq
1:      movl $KDATA, %eax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs

        # TSS: RSP0, IST1, no I/O bitmap; its descriptor (base < 4 GiB)
        leaq rsp0_top(%rip), %rax
        movq %rax, tss+4(%rip)
        leaq ist1_top(%rip), %rax
        movq %rax, tss+0x24(%rip)
        movw $104, tss+0x66(%rip)
        leaq tss(%rip), %rax
        movl %eax, %edx
        andl $0xffffff, %edx
        shlq $16, %rdx
        orq $0x67, %rdx
        movabsq $0x0000890000000000, %rcx       # present, 64-bit TSS (available)
        orq %rcx, %rdx
        movq %rax, %rcx
        shrq $24, %rcx
        shlq $56, %rcx
        orq %rcx, %rdx
        movq %rdx, gdt+0x38(%rip)
        movl $TSS_SEL, %eax
        ltr %ax

        # IDT: 0-31 interrupt gates (DPL 0; #DF on IST1), 0x80 DPL 3
        leaq isr_table(%rip), %rsi
        leaq idt(%rip), %rdi
        xorl %ecx, %ecx
2:      movq (%rsi,%rcx,8), %rax
        movl $0x8e00, %edx
        cmpl $8, %ecx
        jne 3f
        orl $1, %edx
3:      call set_gate
        addq $16, %rdi
        incl %ecx
        cmpl $32, %ecx
        jb 2b
        leaq isr_128(%rip), %rax
        movl $0xee00, %edx
        leaq idt+0x80*16(%rip), %rdi
        call set_gate
        lidt idtr(%rip)

        # SYSCALL / SYSRET
        movl $MSR_STAR, %ecx
        xorl %eax, %eax
        movl $(KCODE | (USER32_BASE << 16)), %edx
        wrmsr
        movl $MSR_LSTAR, %ecx
        leaq syscall_entry(%rip), %rax
        movq %rax, %rdx
        shrq $32, %rdx
        wrmsr
        movl $MSR_FMASK, %ecx
        movl $SYSCALL_FMASK, %eax
        xorl %edx, %edx
        wrmsr

# --- the scenarios ------------------------------------------------------------

        SCEN n_de, de_f, de_r
        xorl %edx, %edx
        movl $1, %eax
        xorl %ecx, %ecx
de_f:   divl %ecx
        call none
de_r:
        SCEN n_ud, ud_f, ud_r
ud_f:   ud2
        call none
ud_r:
        SCEN n_bp, bp_f, bp_r
bp_f:   int3
        call none
bp_r:
        SCEN n_gpsel, gps_f, gps_r
        movl $BAD_SEL, %eax
gps_f:  movw %ax, %ds
        call none
gps_r:
        SCEN n_gpnc, gpn_f, gpn_r
        movabsq $NONCANON, %rax
gpn_f:  movq (%rax), %rbx
        call none
gpn_r:
        SCEN n_pfnp, pfr_f, pfr_r
pfr_f:  movq NP_PAGE, %rax
        call none
pfr_r:
        SCEN n_pfro, pfw_f, pfw_r
pfw_f:  movq $1, RO_PAGE
        call none
pfw_r:
        SCEN n_pfwnp, pfn_f, pfn_r
pfn_f:  movq $1, NP_PAGE + 0x10
        call none
pfn_r:
        SCEN n_pfuser, upf_f, upf_r, ustack_top
        leaq user_pf(%rip), %rax
        jmp enter_user
upf_r:
        SCEN n_pfrsvd, rsv_f, rsv_r
        movabsq $RSVD_ADDR, %rax
rsv_f:  movq (%rax), %rbx
        call none
rsv_r:
        SCEN n_pfnx, NX_PAGE, nx_r, kstack_top-8
        movb $0xc3, NX_PAGE             # a ret, should the fetch wrongly succeed
        movl $NX_PAGE, %eax
        call *%rax
        call none
nx_r:
        SCEN n_int80, i80_f, i80_r, ustack_top, i80_b
        leaq user_int80(%rip), %rax
        jmp enter_user
i80_r:
        SCEN n_syscall, sc_f, sc_r, ustack_top, sc_b
        leaq user_syscall(%rip), %rax
        jmp enter_user
sc_r:
        SCEN n_double, 0, df_r, ustack_top
        movq $RO_PAGE, tss+4(%rip)      # RSP0 = top of the not-present page
        leaq user_double(%rip), %rax
        jmp enter_user
df_r:
        leaq rsp0_top(%rip), %rax
        movq %rax, tss+4(%rip)

        PUTS s_triple
        lidt null_idtr(%rip)
        ud2                             # #UD -> #GP -> #DF -> shutdown
4:      cli
        hlt
        jmp 4b

# --- user mode (CPL3) -----------------------------------------------------------

user_pf:
upf_f:  movq SUP_PAGE, %rax
        movl $3, %eax
        int $0x80

user_int80:
        stc
        movl $1, %eax
i80_f:  int $0x80                       # handler prints, IRETQs back here
        movl %cs, %ebx
        movl $2, %eax
i80_b:  int $0x80
        movl $3, %eax
        int $0x80

user_syscall:
        stc
        std
sc_f:   syscall
        movl %cs, %ebx
        movl $2, %eax
sc_b:   int $0x80
        movl $3, %eax
        int $0x80

user_double:
        ud2
        movl $3, %eax
        int $0x80

# --- helpers (CPL0) -------------------------------------------------------------

# rax = target: IRETQ to CPL3 at rax on the user stack, IF = 0
enter_user:
        pushq $UDATA
        leaq ustack_top(%rip), %rcx
        pushq %rcx
        pushq $2
        pushq $UCODE
        pushq %rax
        iretq

# rdi = gate, rax = handler, edx = bits 32..47 of the gate (IST, type, DPL, P)
set_gate:
        movl %eax, %r8d
        andl $0xffff, %r8d
        orq $(KCODE << 16), %r8
        movq %rdx, %r9
        shlq $32, %r9
        orq %r9, %r8
        movq %rax, %r9
        shrq $16, %r9
        andl $0xffff, %r9d
        shlq $48, %r9
        orq %r9, %r8
        movq %r8, (%rdi)
        movq %rax, %r9
        shrq $32, %r9
        movq %r9, 8(%rdi)
        ret

# dil = character; clobbers rax, rdx
putc:
        movw $COM1_LSR, %dx
1:      inb %dx, %al
        testb $LSR_THR_EMPTY, %al
        jz 1b
        movw $COM1, %dx
        movl %edi, %eax
        outb %al, %dx
        ret

# rsi = string; clobbers rax, rdx, rdi, rsi
puts:
        movzbl (%rsi), %edi
        testl %edi, %edi
        jz 1f
        call putc
        incq %rsi
        jmp puts
1:      ret

# rbx = value, r8d = digits; clobbers rax, rcx, rdx, rdi
puthex:
        leal (,%r8,4), %ecx
1:      subl $4, %ecx
        movq %rbx, %rax
        shrq %cl, %rax
        andl $0xf, %eax
        movzbl hexdigits(%rax), %edi
        call putc
        testl %ecx, %ecx
        jnz 1b
        ret

# "fault: <name> none" for a scenario that did not fault
none:
        PUTS s_fault
        movq scen_name(%rip), %rsi
        call puts
        PUTS s_none
        PUTS s_eol
        ret

# --- exception entry --------------------------------------------------------------

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128
        STUB \v
        .endr

common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rbp
        cld
        movq %cr2, %r12
        movzbl F_VEC(%rbp), %r13d
        cmpl $0x80, %r13d
        jne 1f
        cmpl $2, R_RAX(%rbp)
        je back_line
        cmpl $3, R_RAX(%rbp)
        je none_line
1:      cmpl $8, %r13d
        je double_line

        PUTS s_fault
        movq scen_name(%rip), %rsi
        call puts
        PUTS s_vec
        HEX %r13, 2
        PUTS s_err
        testl $0x100, F_VEC(%rbp)
        jz 2f
        HEX F_ERR(%rbp), 4
        jmp 3f
2:      PUTS s_noerr
3:      PUTS s_cr2
        HEX %r12, 16
        PUTS s_rip
        movq F_RIP(%rbp), %rax
        subq fault_ip(%rip), %rax
        HEX %rax, 8
        PUTS s_rsp
        movq F_RSP(%rbp), %rax
        subq exp_rsp(%rip), %rax
        HEX %rax, 8
        PUTS s_cs
        HEX F_CS(%rbp), 4
        PUTS s_ss
        HEX F_SS(%rbp), 4
        PUTS s_cpl
        movq F_CS(%rbp), %rax
        andl $3, %eax
        HEX %rax, 1
        call print_stack
        PUTS s_eol

        cmpl $0x80, %r13d               # int 0x80, EAX=1: return to the caller as is
        jne recover
        cmpl $1, R_RAX(%rbp)
        jne recover
restore:
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rbp
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rbx
        popq %rax
        addq $16, %rsp
        iretq

# continue the scenario list at recover_ip, at CPL0 on the kernel stack
recover:
        movq recover_ip(%rip), %rax
        movq %rax, F_RIP(%rbp)
        movq $KCODE, F_CS(%rbp)
        movq $2, F_RFLAGS(%rbp)
        leaq kstack_top(%rip), %rax
        movq %rax, F_RSP(%rbp)
        movq $KDATA, F_SS(%rbp)
        jmp restore

none_line:
        call none
        jmp recover

double_line:
        PUTS s_fault
        movq scen_name(%rip), %rsi
        call puts
        PUTS s_vec
        HEX %r13, 2
        PUTS s_err
        HEX F_ERR(%rbp), 4
        PUTS s_cr2page
        movq %r12, %rax
        andq $-4096, %rax
        HEX %rax, 16
        call print_stack
        PUTS s_eol
        jmp recover

back_line:
        PUTS s_fault
        movq scen_name(%rip), %rsi
        call puts
        PUTS s_back
        PUTS s_rip
        movq F_RIP(%rbp), %rax
        subq back_ip(%rip), %rax
        HEX %rax, 8
        PUTS s_rsp
        movq F_RSP(%rbp), %rax
        subq exp_rsp(%rip), %rax
        HEX %rax, 8
        PUTS s_cs
        HEX F_CS(%rbp), 4
        PUTS s_ss
        HEX F_SS(%rbp), 4
        PUTS s_rflags
        HEX F_RFLAGS(%rbp), 16
        PUTS s_rbx
        HEX R_RBX(%rbp), 4
        PUTS s_eol
        jmp recover

# " stack=..." for the frame at %rbp
print_stack:
        PUTS s_stack
        leaq F_TOP(%rbp), %rax
        leaq ist1_top(%rip), %rcx
        leaq s_ist1(%rip), %rsi
        cmpq %rcx, %rax
        je 1f
        movq tss+4(%rip), %rcx
        andq $-16, %rcx
        leaq s_rsp0(%rip), %rsi
        cmpq %rcx, %rax
        je 1f
        movq F_RSP(%rbp), %rcx
        andq $-16, %rcx
        leaq s_same(%rip), %rsi
        cmpq %rcx, %rax
        je 1f
        leaq s_other(%rip), %rsi
1:      jmp puts

# SYSCALL from CPL3: RCX = return RIP, R11 = RFLAGS, RSP still the user's
syscall_entry:
        movq %rsp, sc_ursp(%rip)
        leaq kstack_top(%rip), %rsp
        pushfq
        popq sc_rflags(%rip)
        movq %rcx, sc_rcx(%rip)
        movq %r11, sc_r11(%rip)
        PUTS s_fault
        movq scen_name(%rip), %rsi
        call puts
        PUTS s_rcx
        movq sc_rcx(%rip), %rax
        subq fault_ip(%rip), %rax
        HEX %rax, 8
        PUTS s_r11
        HEX sc_r11(%rip), 16
        PUTS s_rflags
        HEX sc_rflags(%rip), 16
        PUTS s_cs
        movl %cs, %eax
        HEX %rax, 4
        PUTS s_ss
        movl %ss, %eax
        HEX %rax, 4
        PUTS s_rsp
        movq sc_ursp(%rip), %rax
        subq exp_rsp(%rip), %rax
        HEX %rax, 8
        PUTS s_eol
        movq sc_rcx(%rip), %rcx
        movl $SYSRET_R11, %r11d
        movq sc_ursp(%rip), %rsp
        sysretq
