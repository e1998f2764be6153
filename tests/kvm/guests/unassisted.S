# unassisted - runs lock cmpxchg16b at CPL0 in the function `cmpxchg16b_here`, then debug
# exit 0x21. A KVM that cannot emulate it (kvm_pvm) stops the VM instead: pyvmm names the
# instruction, RIP and the symbol (tests pass `nm -n` of this ELF as --system-map).
# pyvmm ELF64 entry.

        .set DEBUG_EXIT_PORT, 0xf4

        .data
        .p2align 4
pair:   .quad 1, 2

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
        call cmpxchg16b_here
        movl $0x21, %eax
        outl %eax, $DEBUG_EXIT_PORT
1:      cli
        hlt
        jmp 1b

        .globl cmpxchg16b_here
        .type cmpxchg16b_here, @function
cmpxchg16b_here:
        movl $1, %eax
        movl $2, %edx
        movl $3, %ebx
        movl $4, %ecx
        leaq pair(%rip), %rdi
        lock cmpxchg16b (%rdi)
        ret
