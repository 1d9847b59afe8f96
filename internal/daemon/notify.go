package daemon

import (
	"fmt"
	"net"
	"os"
)

// sdNotify sends one sd_notify(3) state message (e.g. "READY=1") to the
// service manager over the unix datagram socket named by $NOTIFY_SOCKET
// (a path, or "@name" for the abstract namespace, which Go's net package
// maps). Without $NOTIFY_SOCKET (not started by systemd with Type=notify)
// it does nothing.
func sdNotify(state string) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", addr, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", addr, err)
	}
	return nil
}

// notifyReady tells systemd the daemon is ready: the API socket is
// listening and the configured and remembered mounts have been restored
// (each either mounted or its failure logged). A failure to notify is
// logged, not fatal: systemd then times the start out on its own.
func (d *Daemon) notifyReady() {
	if err := sdNotify("READY=1\nSTATUS=serving " + d.config().Socket); err != nil {
		d.log.Error("readiness notification failed", "err", err)
		return
	}
	d.log.Info("vmcryptd ready", "socket", d.config().Socket)
}
