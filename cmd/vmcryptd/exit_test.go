package main

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// TestExitFor: each kind of failure has the exit code the README lists.
func TestExitFor(t *testing.T) {
	unreachable := fmt.Errorf("daemon at /run/x.sock: dial: %w", api.ErrUnreachable)
	for _, tc := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("anything"), exitError},
		{exitCode(exitProblems), exitProblems},
		{fmt.Errorf("vm check: %w", exitCode(exitProblems)), exitProblems},
		{&api.DeniedError{Msg: "needs Cryptographer.Encrypt"}, exitDenied},
		{&api.StatusError{Code: 403, Kind: api.KindDenied}, exitDenied},
		{&api.StatusError{Code: 409, Kind: api.KindKeyUnavailable}, exitKeyUnavailable},
		{fmt.Errorf("vm decrypt: %w", &api.StatusError{Code: 500, Kind: api.KindInterrupted}), exitInterrupted},
		{&api.StatusError{Code: 500, Kind: api.KindRefused}, exitRefused},
		{&api.StatusError{Code: 400}, exitError},
		{unreachable, exitUnreachable},
	} {
		if got := exitFor(tc.err); got != tc.want {
			t.Errorf("exitFor(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
