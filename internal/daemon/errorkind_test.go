package daemon

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine"
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
		{fmt.Errorf("vm decrypt: %w", engine.ErrConversionInterrupted), api.KindInterrupted},
		{&engine.RefusedError{Path: "vm/vm.nvram", Clause: engine.ClauseKind, Why: "x"}, api.KindRefused},
		{fmt.Errorf("unwrap: %w", engine.ErrLocked), api.KindKeyUnavailable},
		{fmt.Errorf("kek lab/1 %w: dial tcp: refused", engine.ErrKeyUnavailable), api.KindKeyUnavailable},
	} {
		if got := errorKind(tc.err); got != tc.want {
			t.Errorf("errorKind(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
