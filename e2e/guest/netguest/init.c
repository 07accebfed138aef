/*
 * unilet network test guest: PID 1 of an initramfs that runs on Debian's
 * Linux kernel with busybox as its userland. It receives the Unikraft command
 * line conventions unilet emits (DESIGN.md §5) and honours them the way a
 * Unikraft application with lwip, 9pfs and posix-environ would:
 *
 *   netdev.ip=<cidr>:<gw>:<dns0>:<dns1>:<hostname>:<domain>   configure eth0
 *   vfs.fstab=[ "<tag>:<path>:9pfs:<flags>::mkmp" ... ]         mount 9p shares
 *                                      (flags 1 = read-only; an initrd0 extract
 *                                      entry is reported: the kernel already
 *                                      unpacked the initramfs as /)
 *   env.vars=[ "K=V" ... ]                                     environment
 *   -- app args...                                             run the app
 *
 * The command line is read from /proc/cmdline and parsed with Unikraft's
 * grammar, the test kernel's code (../testkernel/ukcmdline.c). Output goes to the serial console (ttyS0).
 * The ACPI power button (QMP system_powerdown) stops the app with SIGTERM and
 * powers the VM off, so a graceful stop works; the app's exit powers off too,
 * unless it failed (status N != 0) without being asked to stop: then the VM
 * ends as a Unikraft application's whose main returned N (crash()).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_TOK 256

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static void poweroff(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

/* crash ends the VM as Unikraft does when main returns N != 0: it prints
 * ukboot's line and halts as crashed — isa-debug-exit's crash code on
 * microvm, pvpanic on pc — so unilet reports exit code N. */
static void crash(int code)
{
	say("[    1.000000] Info: [libukboot] <boot.c @  386> main returned %d, halting system", code);
	sync();
	if (ioperm(0x501, 1, 1) == 0)
		outb(0x2a, 0x501);
	if (ioperm(0x505, 1, 1) == 0)
		outb(1, 0x505);
	poweroff();
}

/* run executes argv (from /bin) and waits; it returns the exit status. */
static int run(char *const argv[])
{
	pid_t p = fork();
	if (p == 0) {
		execv(argv[0], argv);
		_exit(127);
	}
	int st = 0;
	if (p < 0 || waitpid(p, &st, 0) < 0)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* What the command line's library parameters set (ukc_param). */
static char *netspec;
static char *fstab[32];
static int nfs;

/* ukc_param applies one library parameter as a Unikraft application with
 * lwip (netdev.ip), vfscore (vfs.fstab) and posix-environ (env.vars) would. */
static void ukc_param(const char *name, unsigned long name_len, char *value)
{
	if (value && name_len == 9 && !strncmp(name, "netdev.ip", 9)) {
		netspec = value;
	} else if (value && name_len == 9 && !strncmp(name, "vfs.fstab", 9)) {
		if (nfs < 32)
			fstab[nfs++] = value;
	} else if (value && name_len == 8 && !strncmp(name, "env.vars", 8)) {
		char *eq = strchr(value, '=');
		if (eq) {
			*eq = 0;
			setenv(value, eq + 1, 1);
			say("env: %s=%s", value, eq + 1);
			*eq = '=';
		}
	} else {
		say("param: %.*s%s%s", (int)name_len, name, value ? "=" : "", value ? value : "");
	}
}
#define UKC_PARAM ukc_param
#define puts(s) fputs((s), stdout)
#include "../testkernel/ukcmdline.c"
#undef puts

static void load_modules(void)
{
	FILE *f = fopen("/lib/modules/order", "r");
	char line[256];
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		if (!line[0])
			continue;
		char path[300];
		snprintf(path, sizeof path, "/lib/modules/%s", line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) != 0) {
			if (errno != EEXIST)
				say("unilet-netguest: module %s: %s", line, strerror(errno));
		}
		if (fd >= 0)
			close(fd);
	}
	fclose(f);
}

static int wait_for(const char *path, int ms)
{
	for (int i = 0; i < ms / 10; i++) {
		if (access(path, F_OK) == 0)
			return 0;
		usleep(10000);
	}
	return -1;
}

/* field returns the next ':'-separated field of *s (may be empty). */
static char *field(char **s)
{
	char *f = *s;
	if (!f)
		return "";
	char *c = strchr(f, ':');
	if (c) {
		*c = 0;
		*s = c + 1;
	} else {
		*s = NULL;
	}
	return f;
}

static void setup_net(char *spec)
{
	char *s = spec;
	char *cidr = field(&s), *gw = field(&s), *dns0 = field(&s), *dns1 = field(&s);
	char *host = field(&s), *domain = field(&s);
	say("net: ip=%s gw=%s dns=%s,%s hostname=%s domain=%s", cidr, gw, dns0, dns1, host, domain);
	if (wait_for("/sys/class/net/eth0", 5000) < 0) {
		say("net: no eth0 appeared");
		return;
	}
	char *lo[] = {"/bin/ip", "link", "set", "lo", "up", NULL};
	char *up[] = {"/bin/ip", "link", "set", "eth0", "up", NULL};
	char *addr[] = {"/bin/ip", "addr", "add", cidr, "dev", "eth0", NULL};
	char *route[] = {"/bin/ip", "route", "add", "default", "via", gw, NULL};
	run(lo);
	if (run(up) != 0 || (cidr[0] && run(addr) != 0) || (gw[0] && run(route) != 0)) {
		say("net: configuring eth0 failed");
		return;
	}
	if (host[0])
		sethostname(host, strlen(host));
	FILE *f = fopen("/etc/resolv.conf", "w");
	if (f) {
		if (domain[0])
			fprintf(f, "search %s\n", domain);
		if (dns0[0])
			fprintf(f, "nameserver %s\n", dns0);
		if (dns1[0])
			fprintf(f, "nameserver %s\n", dns1);
		fclose(f);
	}
	say("net: eth0 up");
}

static void mkdirs(const char *path)
{
	char p[512];
	snprintf(p, sizeof p, "%s", path);
	for (char *c = p + 1; *c; c++) {
		if (*c == '/') {
			*c = 0;
			mkdir(p, 0755);
			*c = '/';
		}
	}
	mkdir(p, 0755);
}

static void mount_entry(char *entry)
{
	char copy[512];
	snprintf(copy, sizeof copy, "%s", entry);
	char *s = copy;
	char *dev = field(&s), *path = field(&s), *drv = field(&s), *flags = field(&s);
	char *opts = field(&s), *ukopts = field(&s);
	if (strcmp(drv, "extract") == 0) {
		say("fstab: %s (initramfs already extracted as / by the kernel)", entry);
		return;
	}
	if (strcmp(drv, "9pfs") != 0) {
		say("fstab: %s: unsupported driver %s", entry, drv);
		return;
	}
	unsigned long mflags = strtoul(flags, NULL, 0) & MS_RDONLY;
	if (strstr(ukopts, "mkmp"))
		mkdirs(path);
	char data[256];
	snprintf(data, sizeof data, "trans=virtio,version=9p2000.L,msize=262144%s%s", opts[0] ? "," : "", opts);
	if (mount(dev, path, "9p", mflags, data) != 0)
		say("fstab: %s: mount failed: %s", entry, strerror(errno));
	else
		say("fstab: %s mounted%s", entry, mflags ? " read-only" : "");
}

static int power_button(void)
{
	for (int i = 0; i < 8; i++) {
		char p[32], name[64] = "";
		snprintf(p, sizeof p, "/dev/input/event%d", i);
		int fd = open(p, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			continue;
		ioctl(fd, EVIOCGNAME(sizeof name), name);
		if (strstr(name, "Power Button"))
			return fd;
		close(fd);
	}
	return -1;
}

static void console(void)
{
	int fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	struct termios t;
	if (tcgetattr(fd, &t) == 0) {
		t.c_oflag &= ~OPOST; /* \n stays \n in the log */
		t.c_lflag &= ~(ECHO | ICANON);
		t.c_iflag &= ~ICRNL;
		tcsetattr(fd, TCSANOW, &t);
	}
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	console();
	setenv("PATH", "/bin", 1);
	setenv("HOME", "/", 1);

	static char cmdline[8192];
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof cmdline - 1) : 0;
	if (n < 0)
		n = 0;
	cmdline[n] = 0;
	if (fd >= 0)
		close(fd);
	say("unilet-netguest: booted");

	/* Unikraft's grammar, as the test kernel reads it (ukcmdline.c); the
	 * kernel name Unikraft sees as argv[0] is not in /proc/cmdline. */
	static char line[sizeof cmdline + 8] = "netguest ";
	strcat(line, cmdline);
	static char *tok[MAX_TOK + 1];
	char **args;
	unsigned envc;
	int nargs = ukc_boot(line, strlen(line), tok, MAX_TOK, &args, &envc);
	if (nargs < 0)
		poweroff();

	load_modules();
	int button = power_button();
	if (netspec)
		setup_net(netspec);
	for (int i = 0; i < nfs; i++)
		mount_entry(fstab[i]);

	char **argv = args + 1;
	int argc = nargs > 0 ? nargs - 1 : 0;
	for (int i = 0; i < argc; i++)
		say("argv[%d]: %s", i, argv[i]);
	if (argc == 0) {
		say("unilet-netguest: no application; powering off");
		poweroff();
	}
	argv[argc] = NULL;
	say("unilet-netguest: starting %s", argv[0]);
	pid_t app = fork();
	if (app == 0) {
		execvp(argv[0], argv);
		say("unilet-netguest: exec %s: %s", argv[0], strerror(errno));
		_exit(127);
	}
	int stopping = 0;
	struct timespec deadline = {0};
	for (;;) {
		int st;
		pid_t p;
		while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
			if (p == app) {
				int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
				say("unilet-netguest: application exited (%d)", code);
				if (code != 0 && !stopping)
					crash(code);
				poweroff();
			}
		}
		struct pollfd pfd = {.fd = button, .events = POLLIN};
		if (poll(&pfd, button >= 0 ? 1 : 0, 50) > 0) {
			struct input_event ev;
			while (read(button, &ev, sizeof ev) == sizeof ev) {
				if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1 && !stopping) {
					say("unilet-netguest: power button: stopping the application");
					kill(app, SIGTERM);
					stopping = 1;
					clock_gettime(CLOCK_MONOTONIC, &deadline);
					deadline.tv_sec += 2;
				}
			}
		}
		if (stopping) {
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			if (now.tv_sec > deadline.tv_sec)
				kill(app, SIGKILL);
		}
	}
}
