/* Multiboot v1 entry for the unilet test kernel. QEMU's -kernel loader
 * accepts ELF32 multiboot images and passes the command line in the
 * multiboot info structure (EBX). */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* align modules, want memory info */

.section .multiboot, "a"
.align 4
.long MB_MAGIC
.long MB_FLAGS
.long -(MB_MAGIC + MB_FLAGS)

.section .bss
.align 16
stack_bottom:
.skip 65536
stack_top:

.section .note.GNU-stack,"",@progbits
.section .text
.global _start
_start:
	cli
	mov $stack_top, %esp
	push %ebx /* multiboot info */
	push %eax /* multiboot magic */
	call kmain
	/* kmain never returns; halt forever if it does. */
1:	hlt
	jmp 1b

.global triple_fault
triple_fault:
	lidt idt_null
	int $3
	jmp triple_fault

.section .rodata
.align 8
idt_null:
.word 0
.long 0
