/*
 * Host harness for ukcmdline.c: reads command lines separated by NUL bytes
 * on stdin and prints, for each, what the test kernel prints about it
 * (library parameters, argc/argv, envc), each report ended by a NUL byte.
 * Built and run by internal/ukparse's tests to prove the test kernel and
 * unilet's Go model of Unikraft's grammar agree.
 */
#include <stdio.h>
#include <stdlib.h>

#define puts(s) fputs((s), stdout)
#include "ukcmdline.c"
#undef puts

#define MAX_TOKENS 128

int main(void)
{
	static char buf[1 << 16];
	char *argv[MAX_TOKENS];
	unsigned long n = 0;
	int ch;

	for (;;) {
		ch = getchar();
		if (ch != EOF && ch != 0) {
			if (n < sizeof(buf) - 3)
				buf[n++] = (char)ch;
			continue;
		}
		if (ch == EOF && n == 0)
			break;
		buf[n] = buf[n + 1] = buf[n + 2] = 0;
		char **app;
		unsigned envc;
		int argc = ukc_boot(buf, n, argv, MAX_TOKENS, &app, &envc);
		if (argc >= 0) {
			printf("argc: %d\n", argc);
			for (int i = 0; i < argc; i++)
				printf("argv[%d]: %s\n", i, app[i]);
			printf("envc: %u\n", envc);
		}
		putchar(0);
		n = 0;
		if (ch == EOF)
			break;
	}
	return 0;
}
