// Package ukparse is a model of how a Unikraft kernel reads its command line
// at boot, ported statement by statement from Unikraft's sources:
// lib/ukargparse splits the line into tokens (uk_argnparse: whitespace
// separates; '…' and "…" group; a backslash escapes outside single quotes,
// and inside double quotes only before '"' or '\'), lib/uklibparam
// (parser.c) applies "lib.param=value" tokens and "lib.param=[ v … ]" lists
// up to the stop sequence "--", and lib/ukboot hands what follows "--" to
// the application — but only when at least one token precedes "--".
//
// It is the reference the command-line builder (vmm.BuildCmdline) is
// fuzzed against, and the test kernel (e2e/guest/testkernel/ukcmdline.c)
// implements the same algorithm; a differential test keeps the two equal.
// The model treats every "lib.param" as a known parameter, so it reports
// every assignment a guest could be made to accept.
package ukparse

import (
	"fmt"
	"strings"
)

// Split tokenizes cmdline as uk_argnparse does with at most maxCount
// tokens. As in Unikraft, when maxCount is reached the last token runs to
// the end of the line unprocessed.
func Split(cmdline string, maxCount int) []string {
	// A NUL ends the line; two more keep the shifts in bounds.
	if i := strings.IndexByte(cmdline, 0); i >= 0 {
		cmdline = cmdline[:i]
	}
	maxlen := len(cmdline)
	buf := make([]byte, maxlen+3)
	copy(buf, cmdline)
	leftShift := func(index, maxlen int) {
		for index < len(buf)-1 && buf[index] != 0 && index < maxlen {
			buf[index] = buf[index+1]
			index++
		}
	}
	var starts []int
	prevWspace, prevEscape := true, false
	var inQuote byte
	i := 0
	for ; i < maxlen && len(starts) < maxCount; i++ {
		c := buf[i]
		regular := false
		switch c {
		case 0:
			goto out
		case ' ', '\r', '\n', '\t', '\v':
			if inQuote == 0 && !prevEscape {
				buf[i] = 0
				prevWspace = true
				break
			}
			regular = true
		case '\'', '"':
			if prevEscape {
				if inQuote == 0 {
					regular = true // escaping removes the special meaning
					break
				} else if c == '"' { // \" -> "
					leftShift(i-1, maxlen+1)
					i--
					prevEscape = false
					regular = true
					break
				}
			}
			if inQuote == 0 {
				inQuote = c
				leftShift(i, maxlen)
				i--
				break
			}
			if inQuote == c {
				inQuote = 0
				leftShift(i, maxlen)
				i--
				break
			}
			regular = true
		default:
			regular = true
		}
		if !regular {
			continue
		}
		if prevWspace {
			starts = append(starts, i)
			prevWspace, prevEscape = false, false
		}
		if buf[i] == '\\' && inQuote != '\'' {
			if prevEscape { // \\ -> \
				leftShift(i, maxlen)
				i--
				prevEscape = false
			} else {
				prevEscape = true
			}
		} else if prevEscape {
			if inQuote == 0 { // drop the escape symbol
				leftShift(i-1, maxlen+1)
				i--
			}
			prevEscape = false
		}
	}
out:
	toks := make([]string, len(starts))
	for n, s := range starts {
		e := s
		for e < len(buf) && buf[e] != 0 {
			e++
		}
		toks[n] = string(buf[s:e])
	}
	return toks
}

// Param is one value the library-parameter parser assigns: a single value,
// or one element of a list.
type Param struct {
	Name    string // "lib.param"
	Value   string
	NoValue bool // "lib.param" without "=" (booleans: true)
}

func (p Param) String() string {
	if p.NoValue {
		return p.Name
	}
	return p.Name + "=" + p.Value
}

// Boot is what a Unikraft guest makes of its command line.
type Boot struct {
	// Params are the assignments uklibparam makes, in order (env.vars
	// elements included).
	Params []Param
	// Args is the application's argv; Args[0] is the kernel name.
	Args []string
	// Usage: "help" stood among the parameters; the guest prints the
	// parameter list and halts.
	Usage bool
}

// Env returns the environment variables the guest receives (env.vars).
func (b Boot) Env() []string {
	var env []string
	for _, p := range b.Params {
		if p.Name == "env.vars" && !p.NoValue {
			env = append(env, p.Value)
		}
	}
	return env
}

const (
	stateParam = iota
	stateList
)

type parser struct {
	hitStop, hitUsage bool
	state             int
	name              string
	out               []Param
}

// arg is parse_arg of lib/uklibparam/parser.c.
func (c *parser) arg(tok string, scanOnly bool) {
	if tok == "" {
		return
	}
	var value string
	switch c.state {
	case stateParam:
		if tok == "--" {
			c.hitStop = true
			return
		}
		if tok == "help" {
			c.hitUsage = true
			return
		}
		dot := strings.IndexByte(tok, '.')
		if dot < 0 {
			return // no library name: skipped (EINVAL, not strict)
		}
		lib, rest := tok[:dot], tok[dot+1:]
		pname, v, hasValue := strings.Cut(rest, "=")
		if !scanOnly {
			c.name = lib + "." + pname
		}
		if hasValue && strings.HasPrefix(v, "[") {
			c.state = stateList
			v = v[1:]
			if v == "" {
				return
			}
			value = v
			break // to the list element
		}
		if !scanOnly {
			c.out = append(c.out, Param{Name: c.name, Value: v, NoValue: !hasValue})
		}
		return
	case stateList:
		value = tok
	}
	if strings.HasSuffix(value, "]") {
		c.state = stateParam
		value = value[:len(value)-1]
		if value == "" {
			return
		}
	}
	if !scanOnly {
		c.out = append(c.out, Param{Name: c.name, Value: value})
	}
}

// libparamParse is uk_libparam_parse: the index of the stop sequence in
// args, or len(args) when there is none.
func libparamParse(args []string, scanOnly bool) (int, *parser) {
	c := &parser{}
	i := 0
	for ; i < len(args); i++ {
		c.arg(args[i], scanOnly)
		if c.hitStop {
			break
		}
	}
	return i, c
}

// Parse models a Unikraft boot with library parameters enabled
// (CONFIG_LIBUKLIBPARAM): split the line (at most maxCount tokens), scan
// for the stop sequence, apply the parameters before it and give the rest
// to the application, as lib/ukboot does.
func Parse(cmdline string, maxCount int) Boot {
	argv := Split(cmdline, maxCount)
	b := Boot{Args: argv}
	if len(argv) < 1 {
		return b
	}
	rc, _ := libparamParse(argv[1:], true)
	if rc > 0 && rc < len(argv)-1 {
		rc, c := libparamParse(argv[1:], false)
		b.Params = c.out
		if c.hitUsage {
			b.Usage = true
			b.Args = nil
			return b
		}
		b.Args = append([]string{argv[0]}, argv[rc+2:]...)
	}
	return b
}

// Format renders b as the test kernel prints it, line by line.
func (b Boot) Format() string {
	var s strings.Builder
	env := 0
	for _, p := range b.Params {
		if p.Name == "env.vars" && !p.NoValue {
			fmt.Fprintf(&s, "env: %s\n", p.Value)
			env++
			continue
		}
		fmt.Fprintf(&s, "param: %s\n", p)
	}
	if b.Usage {
		s.WriteString("uklibparam: help requested; halting\n")
		return s.String()
	}
	fmt.Fprintf(&s, "argc: %d\n", len(b.Args))
	for i, a := range b.Args {
		fmt.Fprintf(&s, "argv[%d]: %s\n", i, a)
	}
	fmt.Fprintf(&s, "envc: %d\n", env)
	return s.String()
}
