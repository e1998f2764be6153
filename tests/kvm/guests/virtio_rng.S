# virtio_rng - the smallest virtio-mmio driver: one request to a virtio-rng (Multiboot ELF32).
#
# Drives the virtio-mmio device at 0xD1000000 (pyvmm's first virtio-mmio slot, --rng mmio)
# the way virtio 1.2 section 3.1.1 and 4.2.3 say, with as few instructions as possible
# (guest CPL0 code is emulated on a nested KVM):
#
#   check MagicValue "virt", Version 2, DeviceID 4 (entropy source);
#   Status 0 (reset), ACKNOWLEDGE, DRIVER; VERSION_1 only (DriverFeaturesSel 1,
#   DriverFeatures 1); FEATURES_OK and read it back; queue 0: QueueNumMax >= 8, QueueNum 8,
#   the three ring addresses, QueueReady 1; DRIVER_OK;
#   one 16-byte device-writable buffer on the ring, kick (QueueNotify = 0), then poll the
#   used ring's index (bounded: no interrupts, IF stays clear).
#
# Rings and buffer sit at fixed guest-physical addresses so the test can look at them:
# descriptor table 0x200000, available ring 0x201000, used ring 0x202000, buffer 0x203000.
#
# Command line (Multiboot): "mode=1" first breaks the ring on purpose -- the available
# index jumps by 100 on a queue of 8 -- kicks, polls Status until the device raises
# DEVICE_NEEDS_RESET (0x40), prints "needs-reset status=...", resets the device (Status 0,
# which must read back 0), sets it up again and then does the normal request.
#
# Output on COM1, one line for the request:
#   "rng used_id=<dec> used_len=<dec> bytes=0x........ 0x........ 0x........ 0x........ status=0x........"
# (the bytes as four little-endian dwords), then a debug exit:
#   0x10 + mode   success: 16 bytes used and not all of them zero
#   1 bad magic, 2 bad version, 3 not an entropy device, 4 FEATURES_OK not kept,
#   5 queue 0 too small, 6 used index never moved, 7 used length is not 16,
#   8 DEVICE_NEEDS_RESET never came, 9 Status not 0 after reset, 10 the 16 bytes are all zero,
#   11 device does not offer VERSION_1

        .include "common32.inc"

        .set VIRTIO, 0xD1000000
        .set REG_MAGIC, 0x000
        .set REG_VERSION, 0x004
        .set REG_DEVICE_ID, 0x008
        .set REG_DEVICE_FEATURES, 0x010
        .set REG_DEVICE_FEATURES_SEL, 0x014
        .set REG_DRIVER_FEATURES, 0x020
        .set REG_DRIVER_FEATURES_SEL, 0x024
        .set REG_QUEUE_SEL, 0x030
        .set REG_QUEUE_NUM_MAX, 0x034
        .set REG_QUEUE_NUM, 0x038
        .set REG_QUEUE_READY, 0x044
        .set REG_QUEUE_NOTIFY, 0x050
        .set REG_STATUS, 0x070
        .set REG_QUEUE_DESC_LOW, 0x080
        .set REG_QUEUE_DESC_HIGH, 0x084
        .set REG_QUEUE_DRIVER_LOW, 0x090
        .set REG_QUEUE_DRIVER_HIGH, 0x094
        .set REG_QUEUE_DEVICE_LOW, 0x0a0
        .set REG_QUEUE_DEVICE_HIGH, 0x0a4

        .set ST_ACKNOWLEDGE, 1
        .set ST_DRIVER, 2
        .set ST_DRIVER_OK, 4
        .set ST_FEATURES_OK, 8
        .set ST_NEEDS_RESET, 0x40

        .set DESC, 0x200000
        .set AVAIL, 0x201000
        .set USED, 0x202000
        .set BUFFER, 0x203000
        .set RING_AREA_DWORDS, (BUFFER + 16 - DESC) / 4
        .set QSIZE, 8
        .set BUFLEN, 16
        .set VIRTQ_DESC_F_WRITE, 2

        # Poll bounds: ~10 s each on the nested KVM (RAM reads run emulated at ~1M polls/s,
        # each Status read is an exit to the VMM); served kicks end the polls within ms.
        .set USED_POLLS, 10000000
        .set STATUS_POLLS, 500000

        .text
        .code32
        .globl main
main:
        movl $VIRTIO, %ebx              # %ebx: the register window, everywhere below
        movl $1, %eax
        movl REG_MAGIC(%ebx), %edx
        cmpl $0x74726976, %edx          # "virt"
        jne fail
        movl $2, %eax
        movl REG_VERSION(%ebx), %edx
        cmpl $2, %edx
        jne fail
        movl $3, %eax
        movl REG_DEVICE_ID(%ebx), %edx
        cmpl $4, %edx
        jne fail

        xorl %eax, %eax                 # mode: 0 unless the command line says mode=N
        movl $mode_key, %esi
        call cmdline_get_uint
        movl %eax, %edi                 # %edi: the mode, everywhere below

        call setup
        testl %eax, %eax
        jnz fail
        cmpl $1, %edi
        jne request

        # mode 1: the available index jumps past the queue size: the ring is broken.
        movw $100, AVAIL + 2
        movl $0, REG_QUEUE_NOTIFY(%ebx)
        movl $STATUS_POLLS, %ecx
1:      movl REG_STATUS(%ebx), %edx
        testl $ST_NEEDS_RESET, %edx
        jnz 2f
        decl %ecx
        jnz 1b
        movl $8, %eax
        jmp fail
2:      movl $needs_reset_msg, %esi
        call serial_puts
        movl %edx, %eax
        call print_hex
        call serial_newline
        movl $0, REG_STATUS(%ebx)       # reset: DEVICE_NEEDS_RESET goes with it
        movl $9, %eax
        movl REG_STATUS(%ebx), %edx
        testl %edx, %edx
        jnz fail
        call setup
        testl %eax, %eax
        jnz fail

request:
        # descriptor 0: the 16-byte buffer, device-writable, no next
        movl $BUFFER, DESC
        movl $0, DESC + 4
        movl $BUFLEN, DESC + 8
        movw $VIRTQ_DESC_F_WRITE, DESC + 12
        # available ring: slot 0 names descriptor 0, then publish idx 1 (x86 keeps store order)
        movw $0, AVAIL + 4
        movw $1, AVAIL + 2
        movl $0, REG_QUEUE_NOTIFY(%ebx) # kick queue 0

        movl $USED_POLLS, %ecx
3:      cmpw $0, USED + 2
        jne 4f
        decl %ecx
        jnz 3b
        movl $6, %eax
        jmp fail

4:      movl $used_id_msg, %esi
        call serial_puts
        movl USED + 4, %eax
        call print_dec
        movl $used_len_msg, %esi
        call serial_puts
        movl USED + 8, %eax
        call print_dec
        movl $bytes_msg, %esi
        call serial_puts
        xorl %edx, %edx                 # OR of the 16 bytes
        movl $BUFFER, %esi
        movl $4, %ecx
5:      lodsl
        orl %eax, %edx
        call print_hex
        movb $' ', %al
        call serial_putc
        decl %ecx
        jnz 5b
        movl $status_msg, %esi
        call serial_puts
        movl REG_STATUS(%ebx), %eax
        call print_hex
        call serial_newline

        movl $7, %eax
        cmpl $BUFLEN, USED + 8
        jne fail
        movl $10, %eax
        testl %edx, %edx
        jz fail
        leal 0x10(%edi), %eax
fail:
        call debug_exit
        ret                             # to halt_forever, if nothing listens on the port

# setup: reset the device, negotiate VERSION_1 only, describe queue 0 (8 entries, zeroed
# rings), DRIVER_OK. %eax = 0 on success, else the failure code. Clobbers %ecx, %edx.
setup:
        pushl %edi
        movl $0, REG_STATUS(%ebx)
        movl $ST_ACKNOWLEDGE, REG_STATUS(%ebx)
        movl $ST_ACKNOWLEDGE | ST_DRIVER, REG_STATUS(%ebx)
        movl $1, REG_DEVICE_FEATURES_SEL(%ebx)
        movl $11, %eax
        movl REG_DEVICE_FEATURES(%ebx), %edx
        testl $1, %edx                  # VERSION_1 is bit 32
        jz .Lsetup_done
        movl $1, REG_DRIVER_FEATURES_SEL(%ebx)
        movl $1, REG_DRIVER_FEATURES(%ebx)
        movl $0, REG_DRIVER_FEATURES_SEL(%ebx)
        movl $0, REG_DRIVER_FEATURES(%ebx)
        movl $ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK, REG_STATUS(%ebx)
        movl $4, %eax
        movl REG_STATUS(%ebx), %edx
        testl $ST_FEATURES_OK, %edx
        jz .Lsetup_done

        movl $0, REG_QUEUE_SEL(%ebx)
        movl $5, %eax
        movl REG_QUEUE_NUM_MAX(%ebx), %edx
        cmpl $QSIZE, %edx
        jb .Lsetup_done
        movl $DESC, %edi                # fresh rings: flags and indexes 0
        movl $RING_AREA_DWORDS, %ecx
        xorl %eax, %eax
        rep stosl
        movl $QSIZE, REG_QUEUE_NUM(%ebx)
        movl $DESC, REG_QUEUE_DESC_LOW(%ebx)
        movl $0, REG_QUEUE_DESC_HIGH(%ebx)
        movl $AVAIL, REG_QUEUE_DRIVER_LOW(%ebx)
        movl $0, REG_QUEUE_DRIVER_HIGH(%ebx)
        movl $USED, REG_QUEUE_DEVICE_LOW(%ebx)
        movl $0, REG_QUEUE_DEVICE_HIGH(%ebx)
        movl $1, REG_QUEUE_READY(%ebx)
        movl $ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK, REG_STATUS(%ebx)
        xorl %eax, %eax
.Lsetup_done:
        popl %edi
        ret

        .section .rodata
mode_key:
        .asciz "mode"
needs_reset_msg:
        .asciz "needs-reset status="
used_id_msg:
        .asciz "rng used_id="
used_len_msg:
        .asciz " used_len="
bytes_msg:
        .asciz " bytes="
status_msg:
        .asciz "status="
