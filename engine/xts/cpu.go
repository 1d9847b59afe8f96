package xts

import (
	"fmt"
	"strings"

	"github.com/klauspost/cpuid/v2"
)

// CPU capabilities, detected once at package initialisation and read-only
// afterwards. cpuid checks OS support (XGETBV) for the AVX and AVX-512
// register state, not just the CPUID bits.
var (
	cpuAESNI = cpuid.CPU.Supports(cpuid.AESNI, cpuid.CLMUL)
	// vaes256 uses VEX-encoded 256-bit VAESENC/VPCLMULQDQ plus AVX2 integer ops.
	cpuVAES256 = cpuAESNI && cpuid.CPU.Supports(cpuid.AVX, cpuid.AVX2, cpuid.VAES, cpuid.VPCLMULQDQ)
	// vaes512 adds EVEX 512-bit forms; BW is needed for VPSLLDQ/VPSRLDQ on ZMM.
	cpuVAES512 = cpuVAES256 && cpuid.CPU.Supports(cpuid.AVX512F, cpuid.AVX512VL, cpuid.AVX512BW)
)

// preference is the order Available reports usable implementations in:
// fastest first, as measured with this package's benchmarks.
//
// On the Sapphire Rapids class Xeon this was developed on (2 vCPUs, shared
// and busy, so only rough figures), per core at 4 KiB units vaes512 reached
// ~9-10 GB/s, vaes256 ~8, aesni ~4.5 and generic ~0.4; at 512-byte units,
// where the serial tweak encryption and per-call overhead weigh more,
// vaes512 and vaes256 were within noise of each other (~4.5-5.5 GB/s). We
// saw no sign of an AVX-512 frequency penalty, and the ZMM kernel keeps all
// round keys in registers, so vaes512 goes first. A CPU that throttles under
// 512-bit AES can still be given vaes256 by name.
var preference = []Impl{ImplVAES512, ImplVAES256, ImplAESNI, ImplGeneric}

func usable(i Impl) bool {
	switch i {
	case ImplGeneric:
		return true
	case ImplAESNI:
		return asmSupported && cpuAESNI
	case ImplVAES256:
		return asmSupported && cpuVAES256
	case ImplVAES512:
		return asmSupported && cpuVAES512
	}
	return false
}

// Available returns the implementations usable on this CPU, best first.
// ImplGeneric is always present, and always last.
func Available() []Impl {
	var out []Impl
	for _, i := range preference {
		if usable(i) {
			out = append(out, i)
		}
	}
	return out
}

// Choose resolves an implementation name: "" or "auto" selects the best
// available one; any other name must be a known implementation usable on
// this CPU.
func Choose(name string) (Impl, error) {
	switch name {
	case "", "auto":
		return Available()[0], nil
	}
	i := Impl(name)
	for _, known := range preference {
		if i != known {
			continue
		}
		if !usable(i) {
			if !asmSupported {
				return "", fmt.Errorf("xts: implementation %q is not available: this build has no assembly kernels (GOARCH not amd64, or the purego tag)", name)
			}
			return "", fmt.Errorf("xts: implementation %q is not available on this CPU (needs %s; detected %s)",
				name, requirements(i), strings.Join(Features(), ","))
		}
		return i, nil
	}
	names := make([]string, len(preference))
	for k, p := range preference {
		names[k] = string(p)
	}
	return "", fmt.Errorf("xts: unknown implementation %q (known: auto, %s)", name, strings.Join(names, ", "))
}

func requirements(i Impl) string {
	switch i {
	case ImplAESNI:
		return "AESNI, PCLMULQDQ"
	case ImplVAES256:
		return "AESNI, PCLMULQDQ, AVX, AVX2, VAES, VPCLMULQDQ"
	case ImplVAES512:
		return "AESNI, PCLMULQDQ, AVX2, AVX512F, AVX512VL, AVX512BW, VAES, VPCLMULQDQ"
	}
	return "nothing"
}

// Features returns the CPU features relevant to the implementations that
// this CPU has, for diagnostics such as `vmcryptd bench`.
func Features() []string {
	all := []struct {
		name string
		id   cpuid.FeatureID
	}{
		{"AESNI", cpuid.AESNI},
		{"PCLMULQDQ", cpuid.CLMUL},
		{"AVX", cpuid.AVX},
		{"AVX2", cpuid.AVX2},
		{"AVX512F", cpuid.AVX512F},
		{"AVX512VL", cpuid.AVX512VL},
		{"AVX512BW", cpuid.AVX512BW},
		{"VAES", cpuid.VAES},
		{"VPCLMULQDQ", cpuid.VPCLMULQDQ},
	}
	var out []string
	for _, f := range all {
		if cpuid.CPU.Supports(f.id) {
			out = append(out, f.name)
		}
	}
	return out
}
