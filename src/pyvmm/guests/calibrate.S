# calibrate - measures kernel-mode vs user-mode execution speed of a vCPU
# (pyvmm ELF64 entry: long mode, paging on with the low 4 GiB identity-mapped
# by 2 MiB pages with U/S=1 and R/W=1, interrupts off; not QEMU-bootable).
#
# Inputs, written by the VMM into guest RAM before the vCPU starts:
#   physical 0x30000: KERNEL_ITERS (u32, little-endian)
#   physical 0x30004: USER_ITERS   (u32, little-endian)
# Each iteration is "dec %ecx; jnz" = 2 instructions; 0 iterations runs none.
#
# Protocol, all 32-bit MMIO writes to physical 0xD0001000 (MMIO, not port I/O:
# a nested KVM that runs guest user code in hardware ring 3 may refuse port I/O
# at CPL 3 even with IOPL 3, while an MMIO exit works at any privilege level):
#   1  -> KERNEL_ITERS iterations at CPL 0 -> 2
#   then the guest loads its own GDT and stack and IRETQs to CPL 3 (IF = 0):
#   3  -> USER_ITERS iterations at CPL 3   -> 4
# The VMM stops the VM when it sees 4; until then user mode spins on pause
# (hlt would #GP).
#
# Own GDT:
#   0x00 null
#   0x08 kernel code, 64-bit, DPL 0
#   0x10 kernel data, DPL 0
#   0x18 user data, DPL 3     (user SS = 0x1b)
#   0x20 user code, 64-bit, DPL 3 (user CS = 0x23)
# No TSS or IDT is needed: nothing ever goes back from CPL 3 to CPL 0.
# The user code and stack live in this image; pyvmm's identity map marks every
# page user-accessible, so they run in place.

        .set CALIB_MMIO, 0xD0001000
        .set KERNEL_ITERS_ADDR, 0x30000
        .set USER_ITERS_ADDR, 0x30004
        .set KERNEL_CS, 0x08
        .set KERNEL_DS, 0x10
        .set USER_DS, 0x18 | 3
        .set USER_CS, 0x20 | 3
        .set USER_RFLAGS, 0x0002        # reserved bit 1, IF = 0

        .bss
        .p2align 4
kernel_stack:
        .skip 4096
kernel_stack_top:
user_stack:
        .skip 4096
user_stack_top:

        .section .rodata
        .p2align 3
# Accessed bits pre-set so the CPU never writes to the table.
gdt:
        .quad 0
        .quad 0x00AF9B000000FFFF        # 0x08: code, L=1, DPL 0
        .quad 0x00CF93000000FFFF        # 0x10: data, DPL 0
        .quad 0x00CFF3000000FFFF        # 0x18: data, DPL 3
        .quad 0x00AFFB000000FFFF        # 0x20: code, L=1, DPL 3
gdt_end:
        .p2align 3
gdtr:
        .word gdt_end - gdt - 1
        .quad gdt

        .text
        .code64
        .globl _start
_start:
        cli
        cld
        leaq kernel_stack_top(%rip), %rsp
        movl $CALIB_MMIO, %edi
        movl KERNEL_ITERS_ADDR, %ecx    # read before the marker: time only the loop
        movl $1, (%rdi)
        testl %ecx, %ecx
        jz 2f
        .p2align 4
1:      decl %ecx
        jnz 1b
2:      movl $2, (%rdi)

        # Switch to our GDT; reload CS with a far return, then the data segments.
        lgdt gdtr(%rip)
        pushq $KERNEL_CS
        leaq 3f(%rip), %rax
        pushq %rax
        lretq
3:      movw $KERNEL_DS, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        leaq kernel_stack_top(%rip), %rsp

        # IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
        pushq $USER_DS
        leaq user_stack_top(%rip), %rax
        pushq %rax
        pushq $USER_RFLAGS
        pushq $USER_CS
        leaq user_entry(%rip), %rax
        pushq %rax
        iretq

# CPL 3 from here on.
user_entry:
        movl $CALIB_MMIO, %edi
        movl USER_ITERS_ADDR, %ecx
        movl $3, (%rdi)
        testl %ecx, %ecx
        jz 2f
        .p2align 4
1:      decl %ecx
        jnz 1b
2:      movl $4, (%rdi)
3:      pause
        jmp 3b
