# echo - COM1 input test guest (Multiboot ELF32).
#
# Prints "echo: ready", then polls COM1 (LSR bit 0, then RBR) and echoes every
# byte it receives; '\r' and '\n' are echoed as "\r\n".  On 'q' it prints
# "echo: bye" (on a fresh line: "\r\n" first if the last echo was not a line
# end) and debug-exits with value = number of bytes received before the 'q',
# mod 128 ('\r' and '\n' count too).

        .include "common32.inc"

        .text
        .code32
        .globl main
main:
        movl $msg_ready, %esi
        call serial_puts
        xorl %ebx, %ebx                 # bytes received before 'q'
        xorl %edi, %edi                 # 1 while the output line is not empty
.Lecho_poll:
        movw $COM1_LSR, %dx
        inb %dx, %al
        testb $LSR_DATA_READY, %al
        jz .Lecho_poll
        movw $COM1, %dx
        inb %dx, %al
        cmpb $'q', %al
        je .Lecho_quit
        incl %ebx
        cmpb $'\r', %al
        je .Lecho_eol
        cmpb $'\n', %al
        je .Lecho_eol
        call serial_putc
        movl $1, %edi
        jmp .Lecho_poll
.Lecho_eol:
        call serial_newline
        xorl %edi, %edi
        jmp .Lecho_poll
.Lecho_quit:
        testl %edi, %edi
        jz 1f
        call serial_newline
1:      movl $msg_bye, %esi
        call serial_puts
        movl %ebx, %eax
        andl $127, %eax
        call debug_exit
        jmp halt_forever

        .section .rodata
msg_ready:      .asciz "echo: ready\r\n"
msg_bye:        .asciz "echo: bye\r\n"
