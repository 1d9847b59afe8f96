package container

import (
	"fmt"
	"os"

	"github.com/vmcryptd/vmcryptd/engine/xts"
)

// EnvXTSImpl names the environment variable that forces a sector-cipher
// implementation ("vaes512", "vaes256", "aesni", "generic"; empty or
// "auto" picks the fastest this CPU supports). It exists for tests and for
// users on CPUs whose fastest path misbehaves.
const EnvXTSImpl = "VMCRYPTD_XTS_IMPL"

// ChooseImpl returns the sector-cipher implementation the engine uses: the
// one forced by $VMCRYPTD_XTS_IMPL, or the best available.
func ChooseImpl() (xts.Impl, error) {
	impl, err := xts.Choose(os.Getenv(EnvXTSImpl))
	if err != nil {
		return "", fmt.Errorf("$%s: %w", EnvXTSImpl, err)
	}
	return impl, nil
}
