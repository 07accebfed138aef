/*
 * Unikraft's boot-time command-line grammar, for the unilet test kernel:
 * uk_argnparse of lib/ukargparse (tokens: whitespace separates, '…' and "…"
 * group, a backslash escapes outside single quotes and, inside double
 * quotes, only before '"' or '\'), parse_arg/uk_libparam_parse of
 * lib/uklibparam/parser.c ("lib.param=value", lists "lib.param=[ v … ]",
 * the stop sequence "--", "help"), and how lib/ukboot applies them (a scan
 * first; parameters are parsed and dropped from argv only when the stop
 * sequence stands after at least one token).
 *
 * Included by kernel.c and by hostparse.c, the host harness with which a
 * unit test (internal/ukparse) checks this file against unilet's Go model of
 * the same grammar. Freestanding: the includer provides puts() (or UKC_PARAM).
 * Every library parameter counts as known, so each assignment is printed:
 * "env: VALUE" for env.vars elements, "param: lib.name[=VALUE]" otherwise.
 */

static unsigned long ukc_strlen(const char *s)
{
	unsigned long n = 0;
	while (s[n])
		n++;
	return n;
}

static char *ukc_strchr(char *s, char c)
{
	for (; *s; s++)
		if (*s == c)
			return s;
	return 0;
}

static int ukc_streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void left_shift(char *buf, unsigned long index, unsigned long maxlen)
{
	while (buf[index] != '\0' && index < maxlen) {
		buf[index] = buf[index + 1];
		index++;
	}
}

static int uk_argnparse(char *argb, unsigned long maxlen, char *argv[], int maxcount)
{
	int argc = 0;
	int prev_wspace = 1;
	int prev_escape = 0;
	char in_quote = '\0';
	unsigned long i;

	for (i = 0; i < maxlen && argc < maxcount; ++i) {
		switch (argb[i]) {
		case '\0':
			goto out;
		case ' ':
		case '\r':
		case '\n':
		case '\t':
		case '\v':
			if (!in_quote && !prev_escape) {
				argb[i] = '\0';
				prev_wspace = 1;
				break;
			}
			goto regularchar;
		case '\'':
		case '"':
			if (prev_escape) {
				if (!in_quote) {
					goto regularchar;
				} else if (argb[i] == '"') {
					left_shift(argb, i - 1, maxlen + 1);
					--i;
					prev_escape = 0;
					goto regularchar;
				}
			}
			if (!in_quote) {
				in_quote = argb[i];
				left_shift(argb, i, maxlen);
				--i;
				break;
			}
			if (in_quote == argb[i]) {
				in_quote = '\0';
				left_shift(argb, i, maxlen);
				--i;
				break;
			}
			goto regularchar;
		default:
		regularchar:
			if (prev_wspace) {
				argv[argc++] = &argb[i];
				prev_wspace = 0;
				prev_escape = 0;
			}
			if (argb[i] == '\\' && in_quote != '\'') {
				if (prev_escape) {
					left_shift(argb, i, maxlen);
					--i;
					prev_escape = 0;
				} else {
					prev_escape = 1;
				}
			} else if (prev_escape) {
				if (!in_quote) {
					left_shift(argb, i - 1, maxlen + 1);
					--i;
				}
				prev_escape = 0;
			}
			break;
		}
	}
out:
	return argc;
}

enum { PAS_PARAM, PAS_LIST };

struct ukc_ctx {
	int hit_stop;
	int hit_usage;
	int state;
	const char *name; /* "lib.param" of the current parameter */
	unsigned long name_len;
	unsigned envc;
};

static int ukc_is(const char *name, unsigned long name_len, const char *want)
{
	unsigned long i = 0;
	for (; i < name_len && want[i]; i++)
		if (name[i] != want[i])
			return 0;
	return i == name_len && !want[i];
}

#ifndef UKC_PARAM
static void ukc_putn(const char *s, unsigned long n)
{
	char c[2] = {0, 0};
	for (unsigned long i = 0; i < n; i++) {
		c[0] = s[i];
		puts(c);
	}
}

/* By default an assignment is printed (test kernel, host harness); an
 * includer may define UKC_PARAM(name, name_len, value) to apply it itself. */
static void ukc_print_param(const char *name, unsigned long name_len, const char *value)
{
	if (value && ukc_is(name, name_len, "env.vars")) {
		puts("env: ");
		puts(value);
		puts("\n");
		return;
	}
	puts("param: ");
	ukc_putn(name, name_len);
	if (value) {
		puts("=");
		puts(value);
	}
	puts("\n");
}
#define UKC_PARAM ukc_print_param
#endif

/* parse_value for a string parameter: the value ends where its token (or,
 * closing a list, its "]") ends; NULL is a parameter without "=". */
static void ukc_set(struct ukc_ctx *c, char *value, unsigned long value_len)
{
	if (value)
		value[value_len] = '\0';
	if (value && ukc_is(c->name, c->name_len, "env.vars"))
		c->envc++;
	UKC_PARAM(c->name, c->name_len, value);
}

static void parse_arg(struct ukc_ctx *c, char *strbuf, int scan_only)
{
	char *value;
	unsigned long value_len;

	if (strbuf[0] == '\0')
		return;
	switch (c->state) {
	case PAS_PARAM:
		if (ukc_streq(strbuf, "--")) {
			c->hit_stop = 1;
			return;
		}
		if (ukc_streq(strbuf, "help")) {
			c->hit_usage = 1;
			return;
		}
		{
			char *paramname = ukc_strchr(strbuf, '.');
			if (!paramname)
				return; /* no library name: skipped */
			value = ukc_strchr(paramname + 1, '=');
			if (!scan_only) {
				c->name = strbuf;
				c->name_len = (unsigned long)((value ? value : paramname + 1 + ukc_strlen(paramname + 1)) - strbuf);
			}
			if (value) {
				value += 1;
				value_len = ukc_strlen(value);
			} else {
				value_len = 0;
			}
			if (value && value[0] == '[') {
				c->state = PAS_LIST;
				value += 1;
				value_len -= 1;
				if (value_len > 0)
					goto parse_list;
				break;
			}
			if (!scan_only)
				ukc_set(c, value, value_len);
		}
		break;
	case PAS_LIST:
		value = strbuf;
		value_len = ukc_strlen(value);
	parse_list:
		if (value_len >= 1 && value[value_len - 1] == ']') {
			c->state = PAS_PARAM;
			value_len -= 1;
			if (value_len == 0)
				break;
		}
		if (!scan_only)
			ukc_set(c, value, value_len);
		break;
	}
}

/* uk_libparam_parse: the index of the stop sequence, or argc without one. */
static int ukc_libparam_parse(struct ukc_ctx *c, int argc, char **argv, int scan_only)
{
	int i;
	for (i = 0; i < argc; ++i) {
		parse_arg(c, argv[i], scan_only);
		if (c->hit_stop)
			break;
	}
	return i;
}

/*
 * ukc_boot tokenizes cmdline (len bytes) in place into at most maxcount
 * tokens, prints the library parameters it applies, and returns the
 * application's argc with *app set to its argv (argv[0] kept); -1 when
 * "help" stood among the parameters (the guest halts). *envc counts the
 * env.vars elements.
 */
static int ukc_boot(char *cmdline, unsigned long len, char **argv, int maxcount, char ***app, unsigned *envc)
{
	int argc = uk_argnparse(cmdline, len, argv, maxcount);
	struct ukc_ctx c = {0};
	int rc;

	*app = argv;
	*envc = 0;
	if (argc < 1)
		return argc;
	rc = ukc_libparam_parse(&c, argc - 1, &argv[1], 1);
	if (rc > 0 && rc < argc - 1) {
		struct ukc_ctx p = {0};
		rc = ukc_libparam_parse(&p, argc - 1, &argv[1], 0);
		*envc = p.envc;
		if (p.hit_usage) {
			puts("uklibparam: help requested; halting\n");
			return -1;
		}
		rc += 1;
		argc -= rc;
		argv[rc] = argv[0];
		*app = &argv[rc];
	}
	return argc;
}
