package daemon

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

// TestErrorKind: the kind an error answer carries, wrapped or not.
func TestErrorKind(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want api.ErrorKind
	}{
		{errors.New("disk full"), ""},
		{badRequest("bad"), ""},
		{forbidden("needs Cryptographer.Encrypt"), api.KindDenied},
		{fmt.Errorf("vm decrypt: %w", vm.ErrConversionInterrupted), api.KindInterrupted},
		{&vm.RefusedError{Path: "vm/vm.nvram", Clause: vm.ClauseKind, Why: "x"}, api.KindRefused},
		{fmt.Errorf("unwrap: %w", keys.ErrLocked), api.KindKeyUnavailable},
		{fmt.Errorf("kek lab/1 %w: dial tcp: refused", keys.ErrKeyUnavailable), api.KindKeyUnavailable},
	} {
		if got := errorKind(tc.err); got != tc.want {
			t.Errorf("errorKind(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
