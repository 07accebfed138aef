/* KVM probe guest: proves an accelerator can really run a guest. It enables
 * and executes an SSE instruction (where nested/PVM KVM fails), prints a
 * marker on COM1 and powers off. Rebuild: make vmm/kvmprobe/probe.elf */
.section .multiboot, "a"
.align 4
.long 0x1BADB002
.long 0x00000003
.long -(0x1BADB002 + 0x00000003)
.section .note.GNU-stack,"",@progbits
.section .text
.global _start
_start:
	cli
	mov %cr0, %eax
	and $~0x4, %eax      /* clear EM */
	or $0x2, %eax        /* set MP */
	mov %eax, %cr0
	mov %cr4, %eax
	or $0x600, %eax      /* OSFXSR | OSXMMEXCPT */
	mov %eax, %cr4
	xorps %xmm0, %xmm0
	mov $msg, %esi
1:	movb (%esi), %al
	test %al, %al
	jz 2f
	mov $0x3fd, %dx
3:	inb %dx, %al
	test $0x20, %al
	jz 3b
	movb (%esi), %al
	mov $0x3f8, %dx
	outb %al, %dx
	inc %esi
	jmp 1b
2:	mov $0x2000, %ax
	mov $0x604, %dx
	outw %ax, %dx
	mov $0xb004, %dx
	outw %ax, %dx
4:	hlt
	jmp 4b
.section .rodata
msg: .asciz "unilet-kvm-ok\n"
