package vmm

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

func TestGuestCrashStatus(t *testing.T) {
	panicked := ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "the guest kernel panicked (pvpanic)"}
	for _, tc := range []struct {
		name, tail string
		want       ExitStatus
	}{
		{"main returned non-zero", "[    0.1] Info: [libukboot] <boot.c @ 350> main returned 3, halting system\n",
			ExitStatus{Code: 3, Reason: ReasonError, Message: `the application exited with status 3 (its console: "main returned 3, halting system"; Unikraft then halts as crashed)`}},
		{"negative status is its low byte", "main returned -1, halting system\n",
			ExitStatus{Code: 255, Reason: ReasonError, Message: `the application exited with status -1 (its console: "main returned -1, halting system"; Unikraft then halts as crashed)`}},
		{"256 is still a failure", "main returned 256, halting system\n",
			ExitStatus{Code: 1, Reason: ReasonError, Message: `the application exited with status 256 (its console: "main returned 256, halting system"; Unikraft then halts as crashed)`}},
		{"the last main wins", "main returned 2, halting system\nmain returned 7, halting system\n",
			ExitStatus{Code: 7, Reason: ReasonError, Message: `the application exited with status 7 (its console: "main returned 7, halting system"; Unikraft then halts as crashed)`}},
		{"a crash keeps its reason and tells the console", "booted\n\nCRIT: [libukalloc] out of memory\x1b[0m\nUnikraft halted\n",
			ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "the guest kernel panicked (pvpanic); its console last said: CRIT: [libukalloc] out of memory[0m | Unikraft halted"}},
		{"main returned 0 then a panic", "main returned 0, halting system\npanic\n",
			ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "the guest kernel panicked (pvpanic); its console last said: main returned 0, halting system | panic"}},
		{"silent guest", "", panicked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, GuestCrashStatus(panicked, []byte(tc.tail)))
		})
	}
}

func TestConsoleTailKeepsTheEnd(t *testing.T) {
	var c consoleTail
	c.Write([]byte(strings.Repeat("a", consoleTailBytes-2)))
	c.Write([]byte("bcde"))
	b := c.Bytes()
	require.Len(t, b, consoleTailBytes)
	require.True(t, strings.HasSuffix(string(b), "aabcde"))
	c.Write([]byte(strings.Repeat("z", 2*consoleTailBytes) + "end"))
	b = c.Bytes()
	require.Len(t, b, consoleTailBytes)
	require.True(t, strings.HasSuffix(string(b), "zend"))
}

func FuzzGuestCrashStatus(f *testing.F) {
	f.Add([]byte("main returned 3, halting system\n"))
	f.Add([]byte("x\xff\x00\nmain returned -2147483648, halting system"))
	f.Fuzz(func(t *testing.T, tail []byte) {
		st := GuestCrashStatus(ExitStatus{Code: 1, Reason: ReasonGuestPanicked, Message: "m"}, tail)
		require.NotZero(t, st.Code)
		require.True(t, st.Code > 0 && st.Code < 256)
		require.True(t, utf8.ValidString(st.Message))
		require.LessOrEqual(t, len(st.Message), 400)
	})
}
