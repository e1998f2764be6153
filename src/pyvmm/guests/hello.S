# hello - pyvmm's demo guest (Multiboot ELF32, linked at 1 MiB).
#
# Output on COM1:
#   Hello from the pyvmm demo guest
#   cmdline: <the Multiboot command line>
#   memory: <mem_upper + 1024> KiB        ("memory: unknown" without flags bit 0)
# Then: "exit=N" (decimal) on the command line -> debug exit with value N
# (status (N<<1)|1); otherwise, or if that returns, reset through the i8042
# (0xFE to port 0x64); if that returns too, cli; hlt forever.

        .include "common32.inc"

        .text
        .code32
        .globl main
main:
        movl $msg_hello, %esi
        call serial_puts

        movl $msg_cmdline, %esi
        call serial_puts
        call cmdline_ptr
        testl %eax, %eax
        jz 1f
        movl %eax, %esi
        call serial_puts
1:      call serial_newline

        movl $msg_memory, %esi
        call serial_puts
        movl mb_info, %ebx
        testl %ebx, %ebx
        jz 2f
        testl $0x1, (%ebx)              # flags bit 0: mem_lower/mem_upper valid
        jz 2f
        movl 8(%ebx), %eax              # mem_upper: KiB above 1 MiB
        addl $1024, %eax
        call print_dec
        movl $msg_kib, %esi
        call serial_puts
        jmp 3f
2:      movl $msg_unknown, %esi
        call serial_puts
3:
        movl $key_exit, %esi
        call cmdline_get_uint
        jc 4f
        call debug_exit
4:
        movb $0xFE, %al                 # i8042 "pulse reset line"
        outb %al, $0x64
        jmp halt_forever

        .section .rodata
msg_hello:      .asciz "Hello from the pyvmm demo guest\r\n"
msg_cmdline:    .asciz "cmdline: "
msg_memory:     .asciz "memory: "
msg_kib:        .asciz " KiB\r\n"
msg_unknown:    .asciz "unknown\r\n"
key_exit:       .asciz "exit"
