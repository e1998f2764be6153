# syscall64.S - SYSCALL and SYSRET in 64-bit mode (SDM vol. 2 SYSCALL, SYSRET; vol. 3 5.8.8):
# #UD while EFER.SCE=0; SYSCALL loads CS/SS from STAR[47:32], RIP from LSTAR, saves RIP in RCX
# and RFLAGS in R11, clears the RFLAGS bits set in FMASK (and RF); SYSRET (REX.W) returns to
# 64-bit code at CPL3 with CS = STAR[63:48]+16, SS = STAR[63:48]+8 (RPL 3), RFLAGS from R11;
# SYSRET without REX.W returns to compatibility mode (CS = STAR[63:48]); SYSRET at CPL3 is #GP(0);
# SYSRET to a non-canonical RCX is #GP(0) at CPL0 on Intel (before the switch), at CPL3 on AMD.
        .include "common32.inc"
        .include "conform64.inc"

        .set STAR_MSR, 0xC0000081
        .set LSTAR_MSR, 0xC0000082
        .set FMASK_MSR, 0xC0000084
        .set FLAGS_DF, 0x400
        .set FLAGS_AC, 0x40000
        .set FLAGS_TF, 0x100

        .bss
        .p2align 4
user_stack:     .skip 4096
user_stack_top:
sys_cs:         .quad 0
sys_ss:         .quad 0
sys_rcx:        .quad 0
sys_r11:        .quad 0
sys_rflags:     .quad 0
sys_rsp:        .quad 0
user_cs:        .quad 0
user_ss:        .quad 0
user_rflags:    .quad 0
kernel_rsp:     .quad 0

        .text
        .code64
        .globl main64
main64:
        call user_pages64
        # --- EFER.SCE=0: SYSCALL and SYSRET are #UD
        FAULT64 1f
        syscall
1:      CHECK64 syscall.sce0_syscall_ud, ev_vector(%rip), $6

        movl $EFER_MSR, %ecx
        rdmsr
        orl $1, %eax                    # SCE
        wrmsr
        movl $STAR_MSR, %ecx
        xorl %eax, %eax
        movl $(USER32_CS << 16) | CODE64, %edx
        wrmsr
        movl $LSTAR_MSR, %ecx
        leaq syscall_entry(%rip), %rax
        movq %rax, %rdx
        shrq $32, %rdx
        wrmsr
        movl $FMASK_MSR, %ecx
        movl $(FLAGS_DF | FLAGS_AC), %eax
        xorl %edx, %edx
        wrmsr

        # --- SYSCALL at CPL0 with DF and AC set: FMASK clears them, R11 keeps them
        movq %rsp, kernel_rsp(%rip)
        pushfq
        orq $(FLAGS_DF | FLAGS_AC), (%rsp)
        popfq
        syscall
after_syscall0:
        cld
        pushfq
        andq $~FLAGS_AC, (%rsp)
        popfq
        CHECK64 syscall.cs_from_star, sys_cs(%rip), $CODE64
        CHECK64 syscall.ss_from_star, sys_ss(%rip), $DATA64
        leaq after_syscall0(%rip), %rax
        CHECK64 syscall.rcx_next_rip, sys_rcx(%rip), %rax
        movq sys_r11(%rip), %rax
        andq $(FLAGS_DF | FLAGS_AC), %rax
        CHECK64 syscall.r11_saved_rflags, %rax, $(FLAGS_DF | FLAGS_AC)
        movq sys_rflags(%rip), %rax
        andq $(FLAGS_DF | FLAGS_AC), %rax
        CHECK64 syscall.fmask_clears_bits, %rax, $0
        CHECK64 syscall.rsp_unchanged, sys_rsp(%rip), kernel_rsp(%rip)

        # --- SYSRET (REX.W) to 64-bit code at CPL3; it comes back with SYSCALL
        movq %rsp, kernel_rsp(%rip)
        leaq user64(%rip), %rcx
        movq $(2 | FLAGS_DF | 1), %r11  # DF, CF: RFLAGS from R11 (IF stays clear: no stray IRQ)
        leaq user_stack_top(%rip), %rsp
        sysretq
after_user64:
        cli
        cld
        CHECK64 sysret.cs64, user_cs(%rip), $(USER64_CS | 3)
        CHECK64 sysret.ss, user_ss(%rip), $(USER_DS | 3)
        movq user_rflags(%rip), %rax
        andq $(FLAGS_DF | 3), %rax
        CHECK64 sysret.rflags_from_r11, %rax, $(FLAGS_DF | 3)
        CHECK64 sysret.syscall_from_cpl3_cs, sys_cs(%rip), $CODE64
        movq sys_r11(%rip), %rax
        andq $(FLAGS_DF | 1), %rax
        CHECK64 sysret.syscall_r11_user_flags, %rax, $1

        # --- SYSRET without REX.W: compatibility mode (32-bit code at CPL3); back by INT 0x80
        movq %rsp, resume_rsp(%rip)
        call ev_reset64
        leaq after_compat(%rip), %rax
        movq %rax, resume_rip(%rip)
        movq $1, resume_kernel(%rip)
        movl $user32, %ecx
        movq $0x2, %r11
        movl $user_stack_top, %esp
        sysretl
after_compat:
        CHECK64 sysret.compat_vector, ev_vector(%rip), $0x80
        CHECK64 sysret.compat_cs, ev_cs(%rip), $(USER32_CS | 3)
        CHECK64 sysret.compat_ss, ev_ss(%rip), $(USER_DS | 3)
        leaq user32_after_int(%rip), %rax
        CHECK64 sysret.compat_rip, ev_rip(%rip), %rax

        # --- SYSRET at CPL3: #GP(0) (from 64-bit user code; back to CPL0 from the recorder)
        movq %rsp, resume_rsp(%rip)
        call ev_reset64
        leaq after_user_sysret(%rip), %rax
        movq %rax, resume_rip(%rip)
        movq $1, resume_kernel(%rip)
        leaq user64_sysret(%rip), %rcx
        movq $0x2, %r11
        leaq user_stack_top(%rip), %rsp
        sysretq
after_user_sysret:
        CHECK64 sysret.cpl3_gp_vector, ev_vector(%rip), $13
        CHECK64 sysret.cpl3_gp_error, ev_error(%rip), $0
        CHECK64 sysret.cpl3_gp_cs, ev_cs(%rip), $(USER64_CS | 3)
        leaq user64_sysret(%rip), %rax
        CHECK64 sysret.cpl3_gp_rip, ev_rip(%rip), %rax

        # --- SYSRET to a non-canonical RCX: #GP(0) at CPL0, RIP on the SYSRET (back at CPL0
        # whatever happens)
        movq %rsp, resume_rsp(%rip)
        FAULT64 1f
        movq $1, resume_kernel(%rip)
        movabsq $0x0000800000000000, %rcx
        movq $0x2, %r11
2:      sysretq
1:      CHECK64 sysret.noncanonical_gp_vector, ev_vector(%rip), $13
        xorl %eax, %eax
        cpuid
        cmpl $0x68747541, %ebx          # "Auth": AMD takes the #GP at CPL3, at the new RIP
        je 3f
        CHECK64 sysret.noncanonical_gp_cs, ev_cs(%rip), $CODE64
        leaq 2b(%rip), %rax
        CHECK64 sysret.noncanonical_gp_rip, ev_rip(%rip), %rax
        jmp 4f
3:      CHECK64 sysret.noncanonical_gp_cs, ev_cs(%rip), $(USER64_CS | 3)
        movabsq $0x0000800000000000, %rax
        CHECK64 sysret.noncanonical_gp_rip, ev_rip(%rip), %rax
4:
        # --- EFER.SCE=0 again: SYSRET is #UD (last: the nested kvm_pvm KVM hangs here)
        movl $EFER_MSR, %ecx
        rdmsr
        andl $~1, %eax
        wrmsr
        FAULT64 1f
        sysretq
1:      CHECK64 syscall.sce0_sysret_ud, ev_vector(%rip), $6
        ret

# The SYSCALL entry: record what SYSCALL loaded, return to the caller at CPL0 (RCX, R11's flags
# but IF=0), on the kernel stack.
syscall_entry:
        movq %rcx, sys_rcx(%rip)
        movq %r11, sys_r11(%rip)
        movq %rsp, sys_rsp(%rip)
        movq $0, sys_cs(%rip)
        movw %cs, sys_cs(%rip)
        movq $0, sys_ss(%rip)
        movw %ss, sys_ss(%rip)
        pushfq
        popq sys_rflags(%rip)
        movq kernel_rsp(%rip), %rsp
        movw $DATA64, %ax
        movw %ax, %ss
        cmpq $0, in_user(%rip)
        je 1f
        movq $0, in_user(%rip)
        leaq after_user64(%rip), %rcx
1:      jmp *%rcx

        .data
in_user: .quad 0
        .text

# CPL3, 64-bit: record CS, SS, RFLAGS; SYSCALL back to the kernel.
user64:
        movq $0, user_cs(%rip)
        movw %cs, user_cs(%rip)
        movq $0, user_ss(%rip)
        movw %ss, user_ss(%rip)
        pushfq
        popq user_rflags(%rip)
        cld
        movq $1, in_user(%rip)
        syscall
1:      jmp 1b

user64_sysret:
        sysretq
1:      jmp 1b

        .code32
user32:
        int $0x80
user32_after_int:
1:      jmp 1b
        .code64
