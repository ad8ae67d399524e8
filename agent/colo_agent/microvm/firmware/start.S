/* Entry point: the monitor jumps here (0x100000) in 64-bit mode with
 * rsp = 0x80000 and interrupts off (docs/guest-abi.md).
 *
 * The image starts with a short jump over a header that says where the
 * image and its bss end, so a monitor holding only the flat binary can place
 * the heap (boot_info.heap_start) right after it. */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    jmp 1f
    .balign 8
image_header:
    .ascii "COLOFW01"        /* offset 8: header magic */
    .quad _end               /* offset 16: end of image + bss, page aligned */
    .quad __bss_start        /* offset 24: where bss begins */
1:
    cld
    /* Zero bss ourselves: a restarted image must not inherit old state. */
    lea __bss_start(%rip), %rdi
    lea _end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    mov $0x80000, %rsp
    xor %ebp, %ebp
    call firmware_main
2:
    cli
    hlt
    jmp 2b

    .section .note.GNU-stack, "", @progbits
