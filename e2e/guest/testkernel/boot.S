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
	/* Our own flat GDT: the loader's may not outlive it, and interrupt
	 * gates (see kernel.c) need a known code selector. */
	lgdt gdt_ptr
	ljmp $0x08, $1f
1:	mov $0x10, %cx
	mov %cx, %ds
	mov %cx, %es
	mov %cx, %fs
	mov %cx, %gs
	mov %cx, %ss
	push %ebx /* multiboot info */
	push %eax /* multiboot magic */
	call kmain
	/* kmain never returns; halt forever if it does. */
1:	hlt
	jmp 1b

/* Hardware interrupts (PIC vectors 32-47; only the PIT and COM1 are
 * unmasked): count them in ticks, acknowledge the PIC, return. Waiting is
 * "sti; hlt" with the PIT armed one-shot, so an idle guest costs its host
 * next to nothing. */
.global irq_stub
irq_stub:
	push %eax
	incl ticks
	mov $0x20, %al
	outb %al, $0x20
	pop %eax
	iret

/* CPU exceptions: nothing sensible to do in a test kernel; reset. */
.global exc_stub
exc_stub:
	jmp triple_fault

.global triple_fault
triple_fault:
	lidt idt_null
	int $3
	jmp triple_fault

.section .rodata
.align 8
gdt:
.quad 0
.quad 0x00cf9a000000ffff /* 0x08: code, flat 4 GiB, 32-bit */
.quad 0x00cf92000000ffff /* 0x10: data, flat 4 GiB */
gdt_ptr:
.word gdt_ptr - gdt - 1
.long gdt
idt_null:
.word 0
.long 0
