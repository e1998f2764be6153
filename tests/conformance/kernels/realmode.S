# realmode.S - real mode and the switches to and from it (SDM vol. 3 9.9, 20.1, 3.4.3, 6.4;
# vol. 2 INT n): protected -> 16-bit protected -> real mode (CR0.PE cleared, a far jump loads
# CS = 0x0700 with base 0x7000) -> protected again. In real mode: segment:offset addressing,
# INT n through the interrupt table at IDTR.base (not at 0) pushing FLAGS, CS and IP and
# clearing IF/TF, a fault (#GP on a 64 KiB limit) saving the faulting IP, 32-bit operands and
# addresses by prefix, and "unreal mode": a 4 GiB limit loaded in protected mode stays in the
# segment cache in real mode, also after the selector is reloaded there (only the base changes).
# The 16-bit code is copied to 0x7000 and runs with CS base 0x7000: (label - rm_blob) is an
# address there.
        .include "common32.inc"
        .include "conform.inc"

        .set BLOB, 0x7000
        .set BLOB_SEG, BLOB >> 4
        .set IVT, 0x6000                # real mode's interrupt table (IDTR.base)
        .set RM_STACK, 0x6FF0
        .set CODE32, 0x08
        .set DATA32, 0x10
        .set CODE16, 0x18
        .set DATA16, 0x20
        .set PHYS_PROBE, 0x8010         # 0x0800:0x0010 in real mode

        .section .rodata
        .p2align 3
rm_gdt:
        .quad 0
        .quad 0x00CF9B000000FFFF        # 0x08 code32, flat
        .quad 0x00CF93000000FFFF        # 0x10 data, flat (4 GiB limit)
        .quad 0x00009B007000FFFF        # 0x18 code16, base 0x7000, limit 64 KiB
        .quad 0x000093000000FFFF        # 0x20 data16, base 0, limit 64 KiB
rm_gdt_end:
rm_gdtr:
        .word rm_gdt_end - rm_gdt - 1
        .long rm_gdt
rm_idtr:
        .word 0x3FF
        .long IVT

        .bss
marker: .long 0

        .text
        .globl main
main:
        lgdt rm_gdtr
        ljmp $CODE32, $1f
1:      movl $marker, %eax
        movl $0x12345678, marker
        # the blob below 1 MiB; its IVT entries at IVT; a wrong handler for 0x40 at 0:0x100
        movl $rm_blob, %esi
        movl $BLOB, %edi
        movl $rm_blob_end - rm_blob, %ecx
        cld
        rep movsb
        movl $IVT, %edi
        xorl %eax, %eax
        movl $256, %ecx
        rep stosl
        movl $(BLOB_SEG << 16) | ((rm_int40 - rm_blob)), IVT + 0x40 * 4
        movl $(BLOB_SEG << 16) | ((rm_gp - rm_blob)), IVT + 13 * 4
        movl $(BLOB_SEG << 16) | ((rm_wrong - rm_blob)), 0x40 * 4
        movl $marker, BLOB + (rm_marker_address - rm_blob)
        movl %esp, BLOB + (rm_saved_esp - rm_blob)
        movw $0, PHYS_PROBE
        lidt rm_idtr
        ljmp $CODE16, $(rm_entry16 - rm_blob)

pm_back:
        movw $DATA32, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss
        movl BLOB + (rm_saved_esp - rm_blob), %esp
        CHECK realmode.pe_clear, BLOB + (rm_cr0 - rm_blob), $0
        CHECK realmode.cs_selector, BLOB + (rm_cs - rm_blob), $BLOB_SEG
        movzwl PHYS_PROBE, %eax
        CHECK realmode.segment_times_16, %eax, $0xBEEF
        CHECK realmode.int_through_idtr_base, BLOB + (rm_int_seen - rm_blob), $1
        CHECK realmode.int_pushed_ip, BLOB + (rm_int_ip - rm_blob), $((rm_after_int - rm_blob))
        CHECK realmode.int_pushed_cs, BLOB + (rm_int_cs - rm_blob), $BLOB_SEG
        movl BLOB + (rm_int_flags - rm_blob), %eax
        andl $0x400, %eax
        CHECK realmode.int_pushed_flags, %eax, $0x400
        movl BLOB + (rm_handler_flags - rm_blob), %eax
        andl $0x300, %eax
        CHECK realmode.int_clears_if_tf, %eax, $0
        CHECK realmode.gp_on_limit_taken, BLOB + (rm_gp_seen - rm_blob), $1
        CHECK realmode.gp_saved_ip, BLOB + (rm_gp_ip - rm_blob), $((rm_limit_access - rm_blob))
        CHECK realmode.operand32_prefix, BLOB + (rm_sum32 - rm_blob), $0x00020001
        CHECK realmode.unreal_read, BLOB + (rm_unreal1 - rm_blob), $0x12345678
        CHECK realmode.unreal_after_reload, BLOB + (rm_unreal2 - rm_blob), $0x12345678
        CHECK realmode.back_in_protected_mode, marker, $0x12345678
        call done

# ---- 16-bit code, copied to BLOB
        .p2align 4
rm_blob:
        .code16
rm_entry16:                             # 16-bit protected mode, CS base 0x7000
        movw $DATA16, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $DATA32, %ax
        movw %ax, %fs                   # a 4 GiB limit, cached
        movl %cr0, %eax
        andl $~1, %eax
        movl %eax, %cr0
        ljmp $BLOB_SEG, $(rm_real - rm_blob)
rm_real:                                # real mode
        xorw %ax, %ax
        movw %ax, %ss
        movw $RM_STACK, %sp
        movw $BLOB_SEG, %ax
        movw %ax, %ds
        movl %cr0, %eax
        andl $1, %eax
        movl %eax, (rm_cr0 - rm_blob)
        movw %cs, %ax
        movw %ax, (rm_cs - rm_blob)
        movw $0x0800, %ax               # 0x0800:0x0010 is physical 0x8010
        movw %ax, %es
        movw $0xBEEF, %es:0x10
        # INT 0x40 with DF set: the handler at IVT (IDTR.base) records what INT pushed
        std
        int $0x40
rm_after_int:
        cld
        # 32-bit operand and address prefixes
        movl $0x00010000, %eax
        movl $0x00010001, %ebx
        addl %ebx, %eax
        movl %eax, (rm_sum32 - rm_blob)
        # unreal mode: FS kept its 4 GiB limit; reloading FS in real mode changes only its base
        movl (rm_marker_address - rm_blob), %ebx
        movl %fs:(%ebx), %eax
        movl %eax, (rm_unreal1 - rm_blob)
        xorw %ax, %ax
        movw %ax, %fs
        movl %fs:(%ebx), %eax
        movl %eax, (rm_unreal2 - rm_blob)
        # DS has a 64 KiB limit: an access at 0x10000 is #GP; the handler resumes after it
        movl $0x10000, %ebx
rm_limit_access:
        movw (%ebx), %ax
rm_after_gp:
        # back to protected mode
        cli
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $CODE32, $pm_back

rm_int40:
        pushw %bp
        movw %sp, %bp
        movw 2(%bp), %ax
        movw %ax, (rm_int_ip - rm_blob)
        movw 4(%bp), %ax
        movw %ax, (rm_int_cs - rm_blob)
        movw 6(%bp), %ax
        movw %ax, (rm_int_flags - rm_blob)
        pushfw
        popw %ax
        movw %ax, (rm_handler_flags - rm_blob)
        movw $1, (rm_int_seen - rm_blob)
        popw %bp
        iret
rm_wrong:                               # the table at 0 is not the one in use
        movw $2, (rm_int_seen - rm_blob)
        iret
rm_gp:
        pushw %bp
        movw %sp, %bp
        movw 2(%bp), %ax
        movw %ax, (rm_gp_ip - rm_blob)
        movw $(rm_after_gp - rm_blob), 2(%bp)
        movw $1, (rm_gp_seen - rm_blob)
        popw %bp
        iret

        .p2align 2
rm_saved_esp:       .long 0
rm_marker_address:  .long 0
rm_cr0:             .long 0xFF
rm_cs:              .long 0
rm_int_seen:        .long 0
rm_int_ip:          .long 0
rm_int_cs:          .long 0
rm_int_flags:       .long 0
rm_handler_flags:   .long 0xFFFF
rm_gp_seen:         .long 0
rm_gp_ip:           .long 0
rm_sum32:           .long 0
rm_unreal1:         .long 0
rm_unreal2:         .long 0
rm_blob_end:
        .code32
