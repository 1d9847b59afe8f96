package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/internal/daemon"
)

type serveCmd struct {
	Config string `help:"TOML configuration file." required:"" type:"existingfile"`
}

func (s *serveCmd) Run(g *globals) error {
	// Before any key exists in this process.
	if err := daemon.HardenProcess(); err != nil {
		return err
	}
	cfg, err := config.Load(s.Config)
	if err != nil {
		return err
	}
	d, err := daemon.New(daemon.Options{Config: cfg, ConfigPath: s.Config, Logger: g.log, Version: version, RetryInterval: cfg.KeyRetryInterval})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP (systemctl reload) reloads the configuration; it must never
	// kill a daemon whose views are in use, which is Go's default for it.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			if _, err := d.Reload(context.WithoutCancel(ctx)); err != nil {
				g.log.Error("SIGHUP", "err", err)
			}
		}
	}()
	if err := d.Run(ctx); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}
