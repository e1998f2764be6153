# kvmclock - turns on kvm-clock and reports the pvclock structure KVM fills in (KVM only:
# the MSR is KVM's). pyvmm ELF64 entry.
#
# Writes the guest-physical address of a 32-byte aligned pvclock_vcpu_time_info | 1
# (enable) to MSR_KVM_SYSTEM_TIME_NEW (0x4b564d01), then four 32-bit OUTs to port 0x510:
# version, tsc_to_system_mul, tsc_shift | flags << 8, and the low half of system_time.
# Then debug exit 0. (The loader identity-maps the image, so its addresses are physical.)

        .set REPORT_PORT, 0x510
        .set DEBUG_EXIT_PORT, 0xf4
        .set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01

        .data
        .p2align 6
pvclock: .skip 32                       # struct pvclock_vcpu_time_info

        .bss
        .p2align 4
        .skip 4096
stack_top:

        .text
        .code64
        .globl _start
_start:
        cli
        leaq stack_top(%rip), %rsp
        leaq pvclock(%rip), %rax
        orq $1, %rax
        movq %rax, %rdx
        shrq $32, %rdx
        movl $MSR_KVM_SYSTEM_TIME_NEW, %ecx
        wrmsr
        movw $REPORT_PORT, %dx
        movl pvclock(%rip), %eax        # version
        outl %eax, %dx
        movl pvclock+24(%rip), %eax     # tsc_to_system_mul
        outl %eax, %dx
        movzwl pvclock+28(%rip), %eax   # tsc_shift, flags
        outl %eax, %dx
        movl pvclock+16(%rip), %eax     # system_time (low)
        outl %eax, %dx
        xorl %eax, %eax
        outl %eax, $DEBUG_EXIT_PORT
1:      cli
        hlt
        jmp 1b
