package engine

import (
	"os"

	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// openRegular is how the engine opens every existing file of a
// datastore: through the safeopen funnel (O_NOFOLLOW|O_NONBLOCK, the type
// checked on the descriptor), so a FIFO, socket, device or symlink in a
// VM directory is refused with one line naming it and never blocks a
// conversion, a status or a view.
func openRegular(path string, flag int) (*os.File, error) {
	return safeopen.Open(path, flag)
}

// readRegular reads a whole regular file of at most limit bytes through
// the same funnel.
func readRegular(path string, limit int64) ([]byte, error) {
	return safeopen.ReadFile(path, limit)
}

// openRead opens a datastore file for reading (a vmdir.Opener).
func openRead(path string) (*os.File, error) { return openRegular(path, os.O_RDONLY) }
