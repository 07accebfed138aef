/*
 * unilet test kernel: a tiny x86 multiboot guest that behaves like a Unikraft
 * application as far as unilet can observe it.
 *
 *  - prints a boot line on the serial console (COM1);
 *  - reads its command line exactly as a Unikraft kernel does (ukcmdline.c:
 *    ukargparse's tokens, uklibparam's parameters and lists up to "--",
 *    ukboot's hand-over of the rest) and prints every library parameter it
 *    applies ("param: lib.name=value"; env.vars elements as "env: K=V");
 *  - prints argv and the environment, then runs the mode the arguments ask for:
 *      tick=MS       print "tick N" every MS milliseconds (count=N stops after N)
 *      flood=N       print N numbered lines as fast as possible
 *      bigline=N     print one line of N characters
 *      echo          read the serial line and write every byte back
 *      panic         crash as Unikraft does (isa-debug-exit crash code, pvpanic)
 *      exit=N        end as a Unikraft application whose main returned N:
 *                    "main returned N, halting system", then a clean halt
 *                    (N = 0) or Unikraft's crash (any other N)
 *      oom           write every page of guest RAM, then crash "out of
 *                    memory" (the host may OOM-kill QEMU first when the
 *                    container's limit cannot hold guest RAM plus QEMU)
 *      ignore-acpi   ignore the ACPI power button (a guest that must be killed)
 *      sse           enable and execute an SSE instruction (as Unikraft does
 *                    early; nested/PVM KVM fails here with internal-error)
 *  - and powers the machine off (ACPI, isa-debug-exit, then triple fault).
 *  - While it waits (tick, echo) it polls the ACPI power button, so QMP
 *    system_powerdown shuts it down cleanly, as a graceful stop should.
 *  - It waits idle and tickless, like Unikraft's scheduler: the PIT is armed
 *    one-shot for the next deadline (at most 50 ms ahead, its range) and the
 *    CPU halts ("sti; hlt") until that or COM1 input (echo mode) interrupts,
 *    so a waiting VM costs its host next to nothing. (A periodic 100 Hz tick
 *    cost ~1 % of a host core per idle VM under TCG: 100 idle VMs, a core.)
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define COM1 0x3f8
#define MAX_TOKENS 128
#define MAX_CMDLINE 8192

void triple_fault(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO */
	outb(COM1 + 4, 0x0b);
}

static void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void putu(u32 v)
{
	char buf[12];
	int i = 0;
	if (v == 0) {
		putc('0');
		return;
	}
	while (v) {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	}
	while (i)
		putc(buf[--i]);
}

static int hasprefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static u32 atou(const char *s)
{
	u32 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u32)(*s++ - '0');
	return v;
}

static void check_power_button(void);

/* Interrupts: an IDT whose exception gates reset the machine and whose
 * PIC gates (32-47) count interrupts in ticks (boot.S); the PIC remapped to
 * 32-47 with all but the PIT (IRQ0) masked; the PIT one-shot (oneshot). */
#define PIT_HZ 1193182
#define PIT_MAX_MS 50 /* 50 ms = 59659 PIT counts, within its 16 bits */

volatile u32 ticks;
void irq_stub(void);
void exc_stub(void);

static struct {
	u16 off_lo, sel;
	u8 zero, type;
	u16 off_hi;
} __attribute__((packed)) idt[48];

static struct {
	u16 limit;
	u32 base;
} __attribute__((packed)) idt_ptr;

/* oneshot arms PIT channel 0 in mode 0 (one interrupt on terminal count)
 * ms milliseconds ahead (1 … PIT_MAX_MS). */
static void oneshot(u32 ms)
{
	u32 n = ms * (PIT_HZ / 1000);
	outb(0x43, 0x30); /* channel 0, low then high byte, mode 0, binary */
	outb(0x40, (u8)(n & 0xff));
	outb(0x40, (u8)(n >> 8));
}

static void interrupts_init(void)
{
	for (int i = 0; i < 48; i++) {
		u32 h = (u32)(i < 32 ? exc_stub : irq_stub);
		idt[i].off_lo = (u16)h;
		idt[i].off_hi = (u16)(h >> 16);
		idt[i].sel = 0x08;
		idt[i].type = 0x8e; /* present, ring 0, 32-bit interrupt gate */
	}
	/* The PIC reaches the CPU through the local APIC's LINT0, which must be
	 * ExtINT and unmasked (virtual wire mode). SeaBIOS (pc) sets that up;
	 * microvm's firmware leaves LINT0 masked, so no PIT interrupt ever
	 * arrived there. Spurious vector 47 (low nibble 1111): inside our IDT. */
	volatile u32 *lapic = (volatile u32 *)0xfee00000;
	lapic[0xf0 / 4] = 0x100 | 47; /* SVR: APIC software-enabled */
	lapic[0x350 / 4] = 0x700;     /* LVT LINT0: ExtINT, unmasked */
	idt_ptr.limit = sizeof(idt) - 1;
	idt_ptr.base = (u32)idt;
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
	/* 8259 PICs: ICW1-4, master at 32, slave at 40; then mask all but IRQ0. */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 32);
	outb(0xa1, 40);
	outb(0x21, 4);
	outb(0xa1, 2);
	outb(0x21, 1);
	outb(0xa1, 1);
	outb(0x21, 0xfe);
	outb(0xa1, 0xff);
	oneshot(PIT_MAX_MS); /* ends the firmware's periodic 18.2 Hz */
}

/* idle halts until the next interrupt. */
static void idle(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

/* sleep_ms waits ms milliseconds, idle: one PIT interrupt per PIT_MAX_MS
 * at most (the power button is polled at each). */
static void sleep_ms(u32 ms)
{
	while (ms > 0) {
		u32 step = ms < PIT_MAX_MS ? ms : PIT_MAX_MS;
		u32 seen = ticks;
		oneshot(step);
		while (ticks == seen)
			idle();
		check_power_button();
		ms -= step;
	}
}

#define PM1_STS 0x600 /* QEMU pc (PIIX4) PM1a event block, as set up by SeaBIOS */
#define PM1_EN 0x602
#define PWRBTN 0x0100

static void poweroff(void);

static int ignore_acpi;

static void check_power_button(void)
{
	u16 sts = inw(PM1_STS);
	/* 0xffff: no PIIX4 PM block (microvm): nothing to poll. */
	if (!ignore_acpi && sts != 0xffff && (sts & PWRBTN)) {
		outw(PM1_STS, PWRBTN); /* write-1-to-clear */
		puts("unilet-testkernel: power button pressed, powering off\n");
		poweroff();
	}
}

/* crash ends the machine as Unikraft's ukplat_terminate(UKPLAT_CRASH)
 * does under QEMU: isa-debug-exit with the crash code (microvm: QEMU exits
 * 85), then pvpanic (pc: QEMU reports the guest panicked). */
static void crash(void)
{
	outb(0x501, 0x2a);
	outb(0x505, 1);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void poweroff(void)
{
	outw(0x604, 0x2000);  /* QEMU pc/q35 ACPI PM1a control */
	outw(0xb004, 0x2000); /* older QEMU / Bochs */
	outb(0x501, 0x29);    /* isa-debug-exit (microvm): QEMU exits 83, as Unikraft does on a clean halt */
	triple_fault();       /* with -no-reboot, QEMU exits */
}

static char cmdline[MAX_CMDLINE];
static char *argv[MAX_TOKENS];

#include "ukcmdline.c"

static void echo_mode(void)
{
	outb(COM1 + 1, 0x01);   /* interrupt on received data... */
	outb(0x21, 0xfe & ~0x10); /* ...through IRQ4: input wakes idle() at once */
	puts("echo: ready\n");
	for (;;) {
		while (!(inb(COM1 + 5) & 0x01)) {
			check_power_button();
			oneshot(PIT_MAX_MS); /* poll the power button again by then */
			idle();
		}
		char c = (char)inb(COM1);
		if (c == '\r')
			c = '\n';
		putc(c);
	}
}

struct mb_info {
	u32 flags;
	u32 mem_lower, mem_upper;
	u32 boot_device;
	u32 cmdline;
};

extern char _end[]; /* link.ld: the end of the kernel image and its bss */

/* oom_mode writes every page of RAM above the kernel (1 MiB + mem_upper
 * KiB; the multiboot info there was read before), as an allocator handing
 * out all memory would, then crashes as Unikraft does when none is left. */
static void oom_mode(u32 mem_upper_kib)
{
	u32 start = ((u32)_end + 0xfff) & ~0xfffu;
	u32 top = 0x100000 + mem_upper_kib * 1024;
	u32 mib = 0;
	for (u32 p = start; p + 4096 <= top; p += 4096) {
		*(volatile u32 *)p = p;
		if (((p - start + 4096) & 0xffffff) == 0) {
			mib += 16;
			puts("oom: touched ");
			putu(mib);
			puts(" MiB\n");
		}
	}
	puts("oom: out of memory: no free page left in ");
	putu((top - start) >> 20);
	puts(" MiB of guest RAM\n");
	crash();
}

void kmain(u32 magic, struct mb_info *mbi)
{
	serial_init();
	interrupts_init();
	outw(PM1_EN, PWRBTN); /* let QEMU report the ACPI power button */
	puts("unilet-testkernel: booted\n");

	u32 len = 0;
	if (magic == 0x2BADB002 && (mbi->flags & 4) && mbi->cmdline) {
		const char *src = (const char *)mbi->cmdline;
		while (src[len] && len < MAX_CMDLINE - 1) {
			cmdline[len] = src[len];
			len++;
		}
	}
	cmdline[len] = '\0';
	puts("cmdline-length: ");
	putu(len);
	putc('\n');

	/* Unikraft's grammar (ukcmdline.c): parameters before "--" are applied
	 * and dropped; the application gets argv[0] and what follows. */
	char **app;
	unsigned nenv;
	int argc = ukc_boot(cmdline, len, argv, MAX_TOKENS, &app, &nenv);
	if (argc < 0)
		poweroff();
	puts("argc: ");
	putu((u32)argc);
	putc('\n');
	puts("argv[0]: ");
	puts(argc > 0 ? app[0] : "");
	putc('\n');
	u32 tick = 0, count = 0, flood = 0, bigline = 0, exitcode = 0;
	int echo = 0, panic = 0, sse = 0, exitset = 0, oom = 0;
	u32 mem_upper = (magic == 0x2BADB002 && (mbi->flags & 1)) ? mbi->mem_upper : 0;
	for (int i = 1; i < argc; i++) {
		puts("argv[");
		putu((u32)i);
		puts("]: ");
		puts(app[i]);
		putc('\n');
		if (hasprefix(app[i], "tick="))
			tick = atou(app[i] + 5);
		else if (hasprefix(app[i], "count="))
			count = atou(app[i] + 6);
		else if (hasprefix(app[i], "flood="))
			flood = atou(app[i] + 6);
		else if (hasprefix(app[i], "bigline="))
			bigline = atou(app[i] + 8);
		else if (ukc_streq(app[i], "echo"))
			echo = 1;
		else if (ukc_streq(app[i], "panic"))
			panic = 1;
		else if (hasprefix(app[i], "exit=")) {
			exitcode = atou(app[i] + 5);
			exitset = 1;
		} else if (ukc_streq(app[i], "oom"))
			oom = 1;
		else if (ukc_streq(app[i], "sse"))
			sse = 1;
		else if (ukc_streq(app[i], "ignore-acpi"))
			ignore_acpi = 1;
	}
	puts("envc: ");
	putu(nenv);
	putc('\n');

	if (sse) {
		u32 r;
		__asm__ volatile("mov %%cr0, %0; and $~0x4, %0; or $0x2, %0; mov %0, %%cr0" : "=r"(r));
		__asm__ volatile("mov %%cr4, %0; or $0x600, %0; mov %0, %%cr4" : "=r"(r));
		__asm__ volatile("xorps %%xmm0, %%xmm0" ::: "memory");
		puts("sse: ok\n");
	}
	if (bigline) {
		for (u32 i = 0; i < bigline; i++)
			putc((char)('a' + i % 26));
		putc('\n');
	}
	for (u32 i = 1; i <= flood; i++) {
		puts("line ");
		putu(i);
		putc('\n');
	}
	if (panic) {
		puts("panic: requested\n");
		crash();
	}
	if (oom)
		oom_mode(mem_upper);
	if (echo)
		echo_mode();
	if (tick) {
		for (u32 i = 1; count == 0 || i <= count; i++) {
			puts("tick ");
			putu(i);
			putc('\n');
			sleep_ms(tick);
		}
	}
	if (exitset) { /* Unikraft's ukboot, at info level */
		puts("main returned ");
		putu(exitcode);
		puts(", halting system\n");
		if (exitcode)
			crash();
	} else
		puts("unilet-testkernel: exit 0\n");
	poweroff();
}
