package vmm

import (
	"fmt"
	"regexp"
	"strings"
)

// Default guest command-line limits of a Unikraft build (docs/architecture.md, "Guest command line").
const (
	DefaultMaxCmdline = 4096
	DefaultMaxTokens  = 60
	DefaultMaxEnv     = 8
)

// GuestLimits bounds what the guest can parse. Zero values mean the defaults.
type GuestLimits struct {
	MaxCmdline int // characters, including the kernel name QEMU prepends
	MaxTokens  int // argv tokens, including argv[0]
	MaxEnv     int // entries of env.vars
}

func (l GuestLimits) withDefaults() GuestLimits {
	if l.MaxCmdline <= 0 {
		l.MaxCmdline = DefaultMaxCmdline
	}
	if l.MaxTokens <= 0 {
		l.MaxTokens = DefaultMaxTokens
	}
	if l.MaxEnv <= 0 {
		l.MaxEnv = DefaultMaxEnv
	}
	return l
}

// GuestConfig is what the guest command line carries.
type GuestConfig struct {
	// KernelName is what QEMU's multiboot loader prepends as argv[0]
	// (the kernel file path); it counts against the length limit.
	KernelName string
	// Params are Unikraft library parameters, already "name=value" (netdev.ip=…, vfs.fstab=[…]).
	Params []string
	// Fstab is vfs.fstab entries ("tag:/path:9pfs:flags:opts:ukopts"), each
	// emitted quoted inside vfs.fstab=[ … ].
	Fstab []string
	// Env is "K=V" entries delivered as env.vars=[ … ].
	Env []string
	// Args are the application arguments.
	Args []string
	// Features is the image's KConfig; nil means "assume parameters work".
	Features *Features
	Limits   GuestLimits
}

// CmdlineError is an input the guest cannot receive intact. It maps to gRPC InvalidArgument.
type CmdlineError struct{ msg string }

func (e *CmdlineError) Error() string { return e.msg }

func cmdlineErrorf(format string, a ...any) error {
	return &CmdlineError{msg: fmt.Sprintf(format, a...)}
}

var safeToken = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./\-\[\]]+$`)

// QuoteToken quotes one non-empty token so Unikraft's splitter
// (lib/ukargparse; modelled in internal/ukparse) returns it unchanged: safe
// tokens stay bare, others are wrapped in double quotes with '"' and '\'
// escaped by a backslash (inside double quotes a backslash escapes only
// those two; whitespace, leading or not, is kept). An empty token cannot be
// passed at all: callers refuse it.
func QuoteToken(s string) string {
	if safeToken.MatchString(s) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('"')
	for i := 0; i < len(s); i++ { // bytes: any encoding passes unchanged
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// quoteAlways wraps s in double quotes ('"' and '\\' escaped), as kraftkit
// writes vfs.fstab entries.
func quoteAlways(s string) string {
	q := QuoteToken(s)
	if strings.HasPrefix(q, `"`) {
		return q
	}
	return `"` + q + `"`
}

func checkValue(kind, v string) error {
	for _, r := range v {
		if r < 0x20 || r == 0x7f {
			return cmdlineErrorf("%s %q contains a control character (%U); the guest command line cannot carry it", kind, v, r)
		}
	}
	return nil
}

// serviceLinkEnv matches the variables kubelet injects for Services
// (FOO_SERVICE_HOST, FOO_SERVICE_PORT[_NAME], FOO_PORT, FOO_PORT_80_TCP[_PROTO|_PORT|_ADDR]).
var serviceLinkEnv = regexp.MustCompile(`^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)=`)

// IsServiceLinkEnv reports whether a "K=V" entry looks like a kubelet service-link variable.
func IsServiceLinkEnv(kv string) bool { return serviceLinkEnv.MatchString(kv) }

// BuildCmdline builds the Unikraft kernel command line:
//
//	[params… env.vars=[ "K=V" … ] --] args…
//
// "--" is emitted only when at least one library parameter is present. It
// returns human-readable warnings for what had to be dropped (never silently)
// and a *CmdlineError when the result would not reach the guest intact.
func BuildCmdline(c GuestConfig) (string, []string, error) {
	lim := c.Limits.withDefaults()
	var warnings []string
	params := append([]string(nil), c.Params...)
	env := append([]string(nil), c.Env...)

	for i, a := range c.Args {
		if err := checkValue("argument", a); err != nil {
			return "", nil, err
		}
		if a == "" {
			return "", nil, cmdlineErrorf("argument %d is empty: a Unikraft guest cannot receive an empty argument (its parser drops it)", i+1)
		}
	}
	for _, p := range params {
		if err := CheckLibParam(p); err != nil {
			return "", nil, err
		}
	}
	fstab := append([]string(nil), c.Fstab...)
	for _, e := range fstab {
		if err := checkValue("vfs.fstab entry", e); err != nil {
			return "", nil, err
		}
		if e == "" || strings.HasSuffix(e, "]") {
			return "", nil, cmdlineErrorf("vfs.fstab entry %q cannot be a list element (empty, or ends in \"]\")", e)
		}
	}
	for _, e := range env {
		if err := checkValue("environment variable", e); err != nil {
			return "", nil, err
		}
		name, _, ok := strings.Cut(e, "=")
		if !ok || name == "" {
			return "", nil, cmdlineErrorf("environment entry %q is not of the form NAME=value", e)
		}
		if strings.HasPrefix(e, "[") && strings.HasSuffix(e, "]") {
			return "", nil, cmdlineErrorf("environment variable %s: a name starting with \"[\" and a value ending in \"]\" cannot both reach a Unikraft guest intact", name)
		}
	}

	if c.Features != nil && !c.Features.LibParam() {
		if len(params) > 0 || len(env) > 0 || len(fstab) > 0 {
			warnings = append(warnings, fmt.Sprintf(
				"image lacks CONFIG_LIBUKLIBPARAM=y: dropped %d library parameter(s) and %d environment variable(s); only arguments are passed",
				len(params)+len(fstab), len(env)))
		}
		params, env, fstab = nil, nil, nil
	}
	if len(env) > 0 && c.Features != nil && !c.Features.EnvironLibParam() {
		warnings = append(warnings, fmt.Sprintf(
			"image lacks CONFIG_LIBPOSIX_ENVIRON_LIBPARAM=y: dropped %d environment variable(s)", len(env)))
		env = nil
	}
	if len(env) > lim.MaxEnv {
		// Kubelet injects service-link variables into every container; drop
		// those that do not fit (documented), and fail if the pod's own
		// variables alone overflow.
		own := countNonService(env)
		if own > lim.MaxEnv {
			return "", nil, cmdlineErrorf("%d environment variables exceed the guest limit of %d (env.vars); reduce the container's env", own, lim.MaxEnv)
		}
		budget := lim.MaxEnv - own
		var kept, dropped []string
		for _, e := range env {
			switch {
			case !IsServiceLinkEnv(e):
				kept = append(kept, e)
			case budget > 0:
				kept = append(kept, e)
				budget--
			default:
				dropped = append(dropped, strings.SplitN(e, "=", 2)[0])
			}
		}
		env = kept
		warnings = append(warnings, fmt.Sprintf(
			"guest accepts at most %d environment variables: dropped Kubernetes service-link variables %s",
			lim.MaxEnv, strings.Join(dropped, ",")))
	}

	var toks []string
	for _, p := range params {
		toks = append(toks, QuoteToken(p))
	}
	if len(fstab) > 0 {
		toks = append(toks, "vfs.fstab=[")
		for _, e := range fstab {
			toks = append(toks, quoteAlways(e))
		}
		toks = append(toks, "]")
	}
	toks = appendEnv(toks, env)
	// "--" ends the library parameters. It is emitted when parameters are
	// present, or when an argument is itself "--" (which the guest would
	// otherwise take for the separator and swallow what precedes it). The
	// guest honours "--" only after at least one token, so an argument "--"
	// without parameters gets a bare word first (a token without a library
	// name, which the parser skips). A guest without library parameters
	// passes everything through: no separator then.
	if c.Features.LibParam() && (len(toks) > 0 || containsString(c.Args, "--")) {
		if len(toks) == 0 {
			toks = append(toks, SeparatorFiller)
		}
		toks = append(toks, "--")
	}
	for _, a := range c.Args {
		toks = append(toks, QuoteToken(a))
	}
	line := strings.Join(toks, " ")

	if n := len(toks) + 1; n > lim.MaxTokens {
		return "", nil, cmdlineErrorf("guest command line has %d tokens, the guest accepts at most %d (arguments, parameters and environment together)", n, lim.MaxTokens)
	}
	total := len(line)
	if c.KernelName != "" {
		total += len(c.KernelName) + 1
	}
	if total >= lim.MaxCmdline {
		return "", nil, cmdlineErrorf("guest command line is %d characters, the guest accepts at most %d; shorten the arguments or environment", total, lim.MaxCmdline-1)
	}
	return line, warnings, nil
}

// SeparatorFiller is the bare word emitted before "--" when there are no
// library parameters but an argument is "--" (see BuildCmdline).
const SeparatorFiller = "unilet"

// appendEnv emits the environment as env.vars elements. Inside a list
// ("env.vars=[ … ]") a token ending in "]" closes the list, so an entry
// ending in "]" goes on its own as "env.vars=NAME=value…]" (each token
// adds one element to the array), between lists.
func appendEnv(toks, env []string) []string {
	open := false
	for _, e := range env {
		if strings.HasSuffix(e, "]") {
			if open {
				toks, open = append(toks, "]"), false
			}
			toks = append(toks, QuoteToken("env.vars="+e))
			continue
		}
		if !open {
			toks, open = append(toks, "env.vars=["), true
		}
		toks = append(toks, QuoteToken(e))
	}
	if open {
		toks = append(toks, "]")
	}
	return toks
}

// libParamToken is what a library parameter must look like to stay one
// parameter: a library name, a parameter name and an optional value.
var libParamToken = regexp.MustCompile(`^[A-Za-z0-9_]+\.[A-Za-z0-9_]+(=.*)?$`)

// CheckLibParam refuses a library parameter the guest would not read as
// exactly itself: no library name, or a value opening a list it does not
// close in the same token (which would swallow "--" and every argument).
func CheckLibParam(p string) error {
	if err := checkValue("library parameter", p); err != nil {
		return err
	}
	if !libParamToken.MatchString(p) {
		return cmdlineErrorf("library parameter %q is not of the form lib.name=value", p)
	}
	if _, v, _ := strings.Cut(p, "="); strings.HasPrefix(v, "[") && !strings.HasSuffix(v, "]") {
		return cmdlineErrorf("library parameter %q opens a list (\"[\") it does not close", p)
	}
	return nil
}

func countNonService(env []string) int {
	n := 0
	for _, e := range env {
		if !IsServiceLinkEnv(e) {
			n++
		}
	}
	return n
}

// Features is the set of CONFIG_*=y KConfig options an image declares in os.features.
type Features struct {
	set map[string]bool
}

// NewFeatures parses os.features entries ("CONFIG_X=y"). An empty list returns nil:
// with no features recorded, everything is assumed supported.
func NewFeatures(list []string) *Features {
	if len(list) == 0 {
		return nil
	}
	f := &Features{set: map[string]bool{}}
	for _, e := range list {
		k, v, ok := strings.Cut(strings.TrimSpace(e), "=")
		if !ok {
			continue
		}
		if v == "y" || v == "m" {
			f.set[k] = true
		}
	}
	return f
}

// Has reports whether CONFIG option name is enabled; nil Features has everything.
func (f *Features) Has(name string) bool {
	if f == nil {
		return true
	}
	return f.set[name]
}

// LibParam: the guest parses library parameters.
func (f *Features) LibParam() bool { return f.Has("CONFIG_LIBUKLIBPARAM") }

// EnvironLibParam: the guest takes env.vars.
func (f *Features) EnvironLibParam() bool { return f.Has("CONFIG_LIBPOSIX_ENVIRON_LIBPARAM") }

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
