package main

import (
	"io"
	"log/slog"
)

// logFormat picks how logs are written: "text" on a terminal, "json"
// otherwise (journald, a log file), unless format says which.
func logFormat(format string, terminal bool) string {
	switch format {
	case "json", "text":
		return format
	}
	if terminal {
		return "text"
	}
	return "json"
}

// newLogger returns the process's logger writing to w.
func newLogger(w io.Writer, format string, terminal bool, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if logFormat(format, terminal) == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
