package fusefs

import (
	"syscall"

	"github.com/vmcryptd/vmcryptd/engine/view"
)

// Policy: the checks a name operation passes before it touches the backing
// store (busy VMs, key lines, moves across the encryption boundary).

// mayTruncate asks the backend whether the plain file rel may be
// cut (see Backend.MayTruncate).
func (s *state) mayTruncate(rel string) syscall.Errno {
	if err := s.backend.MayTruncate(rel); err != nil {
		s.log.Warn("refused truncate", "path", rel, "err", err)
		return errnoOf(err)
	}
	return 0
}

// gated refuses (EBUSY) touching files the backend says are busy (MayOpen)
// (a VM in the middle of a conversion, which is about to replace them):
// plain opens and truncates, and the name changes unlink, rename, link,
// symlink and mknod. A rename there would leave the unconverted original
// (plaintext, during an encrypt) under its new name while the conversion
// puts its result back at the old one.
func (s *state) gated(op string, rels ...string) syscall.Errno {
	for _, rel := range rels {
		if err := s.backend.MayOpen(rel); err != nil {
			s.log.Warn("refused "+op, "path", rel, "err", err)
			return errnoOf(err)
		}
	}
	return 0
}

// crossesBoundary says whether moving the regular file at oldRel to newRel
// would change how it is stored (plain into an encrypted directory or a
// container out of one); such moves get EXDEV so tools copy instead.
func (s *state) crossesBoundary(oldRel, newRel string) (bool, syscall.Errno) {
	class, _, err := s.backend.Classify(oldRel)
	if err != nil {
		s.log.Error("cannot classify file", "path", oldRel, "err", err)
		return false, syscall.EIO
	}
	enc, err := s.backend.WouldEncrypt(newRel)
	if err != nil {
		s.log.Error("cannot place file", "path", newRel, "err", err)
		return false, syscall.EIO
	}
	return enc != (class != view.FilePlain), 0
}

// moveCheck applies crossesBoundary to a directory entry about to be
// renamed or linked; directories are checked entry by entry by the tools
// that fall back to copying, so only regular files are refused here.
func (s *state) moveCheck(oldRel, oldAbs, newRel string) syscall.Errno {
	var st syscall.Stat_t
	if _, err := lstatPath(oldAbs, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return 0
	}
	cross, errno := s.crossesBoundary(oldRel, newRel)
	if errno != 0 {
		return errno
	}
	if cross {
		return syscall.EXDEV
	}
	return 0
}
