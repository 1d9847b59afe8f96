//go:build asmgen

// Command asmgen generates the amd64 XTS-AES-256 kernels of package xts with
// avo. Run it through `go generate` in engine/xts (see gen.go there); the
// output is committed and a test checks it is reproduced byte for byte.
//
// Every kernel works on whole 16-byte blocks only. Ciphertext stealing and
// all input validation live in Go: they are rare or cheap, and keeping them
// out of assembly keeps the assembly small and reviewable.
//
// Conventions shared by all kernels:
//
//   - Only physical registers are used, so avo's allocator has nothing to do
//     and the register plan documented below is exactly what runs.
//   - GPRs: AX K1 round keys, DX K2 round keys, BX dst, CX src, SI unit
//     count, DI unit length in bytes, R8 bytes left in the current unit,
//     R11:R12 the 128-bit unit number, R13 the explicit-tweak pointer.
//   - Tweaks: normally (tk != nil) an XTS kernel encrypts each unit's number
//     with K2 itself, at the start of the unit, and increments the 128-bit
//     counter. That encryption is a serial 15-round chain, but it depends only
//     on the counter, so out-of-order execution overlaps it with the previous
//     unit's data blocks; and a single-unit call (the common 4 KiB or 512 B
//     request) needs one kernel call, not an ECB call plus an XTS call. With
//     tk == nil the kernel instead reads one already-encrypted tweak per unit
//     from tw; the Go side uses that for ciphertext stealing and tests use it
//     (a zero tweak turns the kernel into plain ECB).
//
// GF(2^128) arithmetic (IEEE 1619 convention): a 16-byte tweak is a 128-bit
// little-endian integer T and T*x = (T<<1) ^ (0x87 if bit 127 was set). More
// generally, for 1 <= k <= 56,
//
//	T * x^k = (T << k) ^ clmul(T >> (128-k), 0x87)
//
// because the k bits shifted out, carry-less multiplied by x^128 mod P =
// x^7+x^2+x+1 (0x87), give at most k+7 < 64 bits, so no second reduction is
// needed. Vector units have no 128-bit shift, so it is assembled from the two
// 64-bit halves of each 128-bit lane: shift both qwords, move the carry of the
// low qword into the high one with a byte shift, and fold the carry out of
// the high qword back in with one PCLMULQDQ against 0x87. For k a multiple of
// 8 it is simpler still: a whole-lane byte shift (PSLLDQ) plus one PCLMULQDQ
// of the top bytes. This is how all kernels advance their tweaks without any
// serial doubling chain (the same idea as the Linux kernel's
// aes-xts-avx-x86_64.S; the code here is independent).
package main

import (
	"fmt"
	"log"
	"os"

	. "github.com/mmcloughlin/avo/build"
	"github.com/mmcloughlin/avo/ir"
	. "github.com/mmcloughlin/avo/operand"
	. "github.com/mmcloughlin/avo/reg"
)

// Go-assembly register names by number; avo exposes them as variables.
var (
	xr = []VecPhysical{X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15}
	yr = []VecPhysical{Y0, Y1, Y2, Y3, Y4, Y5, Y6, Y7, Y8, Y9, Y10, Y11, Y12, Y13, Y14, Y15}
	zr = []VecPhysical{Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
		Z16, Z17, Z18, Z19, Z20, Z21, Z22, Z23, Z24, Z25, Z26, Z27, Z28, Z29, Z30, Z31}
)

// Constant tables.
var (
	polyMem  Mem // 16 bytes: qword 0x87, qword 0 (the XTS reduction constant)
	poly4Mem Mem // 64 bytes: polyMem in each of four 128-bit lanes
	shlMem   Mem // 64 bytes: per-qword left shifts 0,0,1,1,2,2,3,3 (lane j gets x^j)
	shrMem   Mem // 64 bytes: matching right shifts 64,64,63,63,62,62,61,61
)

func main() {
	// The reproducibility test (TestGeneratedAssemblyUpToDate) regenerates
	// into a temporary directory; an environment variable rather than a flag
	// keeps the command line, which avo records in the file header, identical.
	if dir := os.Getenv("XTS_ASMGEN_OUTDIR"); dir != "" {
		if err := os.Chdir(dir); err != nil {
			log.Fatal(err)
		}
	}
	ConstraintExpr("amd64,!purego")

	polyMem = GLOBL("xtsPoly", RODATA|NOPTR)
	DATA(0, U64(0x87))
	DATA(8, U64(0))

	// DATA fills the most recently declared global, so declare and fill in turn.
	poly4Mem = GLOBL("xtsPoly4", RODATA|NOPTR)
	for j := 0; j < 4; j++ {
		DATA(16*j, U64(0x87))
		DATA(16*j+8, U64(0))
	}
	shlMem = GLOBL("xtsLaneShl", RODATA|NOPTR)
	for j := 0; j < 4; j++ {
		DATA(16*j, U64(uint64(j)))
		DATA(16*j+8, U64(uint64(j)))
	}
	shrMem = GLOBL("xtsLaneShr", RODATA|NOPTR)
	for j := 0; j < 4; j++ {
		DATA(16*j, U64(uint64(64-j)))
		DATA(16*j+8, U64(uint64(64-j)))
	}

	genAESNI()
	genVAES256()
	genVAES512()

	Generate()
}

// ---------------------------------------------------------------------------
// Raw instruction emission. avo v0.5.0 only knows the XMM forms of
// VAESENC/VAESENCLAST/VAESDEC/VAESDECLAST/VPCLMULQDQ, so those (and, for
// uniformity, the legacy AESENC family) are emitted directly.

func raw(op string, operands []Op, inputs []Op, outputs []Op) {
	Instruction(&ir.Instruction{Opcode: op, Operands: operands, Inputs: inputs, Outputs: outputs})
}

// sse2 emits a two-operand legacy SSE instruction "op src, dst" (dst op= src).
func sse2(op string, src, dst Op) {
	raw(op, []Op{src, dst}, []Op{src, dst}, []Op{dst})
}

// vex3 emits a three-operand AVX instruction "op src2, src1, dst".
func vex3(op string, src2, src1, dst Op) {
	raw(op, []Op{src2, src1, dst}, []Op{src2, src1}, []Op{dst})
}

// clmul emits "VPCLMULQDQ $imm, src2, src1, dst" for any vector width.
// imm bit 0 selects the qword of src1, imm bit 4 the qword of src2 (Intel's
// order is reversed in Go syntax).
func clmul(imm uint8, src2, src1, dst Op) {
	raw("VPCLMULQDQ", []Op{U8(imm), src2, src1, dst}, []Op{src2, src1}, []Op{dst})
}

func mem(base Register, disp int) Mem { return Mem{Base: base, Disp: disp} }

type dir struct {
	round, last string
	suffix      string
}

var (
	encDir = dir{"AESENC", "AESENCLAST", "Enc"}
	decDir = dir{"AESDEC", "AESDECLAST", "Dec"}
)

func loadArgs(xts bool) {
	Load(Param("rk"), RAX)
	Load(Param("dst"), RBX)
	Load(Param("src"), RCX)
	if xts {
		Load(Param("tk"), RDX)
		Load(Param("tw"), R13)
		Load(Param("lo"), R11)
		Load(Param("hi"), R12)
		Load(Param("nunits"), RSI)
		Load(Param("ulen"), RDI)
	} else {
		Load(Param("nblocks"), RSI)
	}
}

const (
	xtsSig = "func(rk *byte, tk *byte, dst *byte, src *byte, tw *byte, lo uint64, hi uint64, nunits int, ulen int)"
	ecbSig = "func(rk *byte, dst *byte, src *byte, nblocks int)"
)

var xtsDoc = []string{
	"rk: K1 schedule; tk: K2 schedule (16-byte keys), or nil to read pre-encrypted tweaks from tw;",
	"lo, hi: the first unit number. Processes nunits units of ulen bytes (a multiple of 16).",
}

func docXTS(first string, more ...string) {
	Doc(append(append([]string{first}, xtsDoc...), more...)...)
}

// nextCounter increments the 128-bit unit number R11:R12.
func nextCounter() {
	ADDQ(U8(1), R11)
	ADCQ(U8(0), R12)
}

// ---------------------------------------------------------------------------
// aesni: legacy-SSE AES-NI, 8 blocks in flight.
//
// Register plan: X0-X7 the eight data blocks, X8 the current round key
// (one load per round rather than a memory operand per block, which measured
// ~15% faster), X9 the 0x87 constant, X10-X14 temporaries, X15 the next
// unit's encrypted tweak (software pipelining, as in vaes512). Sixteen registers
// cannot also hold eight tweaks, so those live in two 128-byte stack buffers:
// the current iteration's, and the next iteration's, which is computed (x^8
// per tweak, spread between the AES rounds) while the current one is in
// use; the buffers swap roles each iteration. The key schedules live in a
// page-aligned mmap region, so legacy SSE's 16-byte alignment rule holds for
// the round-key memory operands of the single-block tail.

// mulXkSSE sets dst = src * x^k (1 <= k <= 56) using t1, t2 as temporaries
// and poly (0x87 in qword 0).
func mulXkSSE(dst, src VecPhysical, k int, t1, t2, poly VecPhysical) {
	MOVO(src, t1)
	PSRLQ(U8(64-k), t1) // t1 = bits carried out of each qword
	MOVO(src, dst)
	PSLLQ(U8(k), dst)
	MOVO(t1, t2)
	PSLLDQ(U8(8), t2)             // low qword's carry moves into the high qword
	PCLMULQDQ(U8(0x01), poly, t1) // high qword's carry-out times 0x87
	PXOR(t2, dst)
	PXOR(t1, dst)
}

func genAESNI() {
	for _, d := range []dir{encDir, decDir} {
		genXTSAESNI(d)
	}
	genECBAESNI()
}

func aesniRounds(d dir, regs []VecPhysical) {
	for _, x := range regs {
		PXOR(mem(RAX, 0), x)
	}
	for r := 1; r <= 13; r++ {
		for _, x := range regs {
			sse2(d.round, mem(RAX, 16*r), x)
		}
	}
	for _, x := range regs {
		sse2(d.last, mem(RAX, 16*14), x)
	}
}

// nextTweakSSE sets X15 = E_K2(R11:R12), the unit number, and increments
// the counter (X14 is clobbered).
func nextTweakSSE() {
	MOVQ(R11, X15)
	MOVQ(R12, X14)
	PUNPCKLQDQ(X14, X15)
	PXOR(mem(RDX, 0), X15)
	for r := 1; r <= 13; r++ {
		sse2("AESENC", mem(RDX, 16*r), X15)
	}
	sse2("AESENCLAST", mem(RDX, 16*14), X15)
	nextCounter()
}

func genXTSAESNI(d dir) {
	TEXT("xts"+d.suffix+"AESNI", NOSPLIT, xtsSig)
	Pragma("noescape")
	docXTS(fmt.Sprintf("xts%sAESNI is the XTS kernel for AES-NI (schedules 16-byte aligned).", d.suffix))
	// Two 8-tweak buffers (current and next) plus slack for 16-byte alignment.
	scratch := AllocLocal(2*128 + 16)
	loadArgs(true)
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	MOVOU(polyMem, X9)
	TESTQ(RDX, RDX)
	JZ(LabelRef("unit"))
	nextTweakSSE()

	Label("unit")
	MOVQ(RDI, R8)
	Comment("R9 = current tweak buffer (16-byte aligned), R10 = next.")
	LEAQ(scratch, R9)
	ADDQ(U8(15), R9)
	ANDQ(I8(-16), R9)
	LEAQ(mem(R9, 128), R10)
	TESTQ(RDX, RDX)
	JZ(LabelRef("explicit"))
	MOVO(X15, X10)
	Comment("Start the next unit's tweak unless this is the last unit.")
	CMPQ(RSI, U8(1))
	JE(LabelRef("tweak"))
	nextTweakSSE()
	JMP(LabelRef("tweak"))
	Label("explicit")
	MOVOU(mem(R13, 0), X10)
	ADDQ(U32(16), R13)
	Label("tweak")
	Comment("Tweaks of blocks 0..7: T*x^0..T*x^7, computed independently (no serial chain)",
		"into the still unused data registers.")
	MOVOU(X10, mem(R9, 0))
	for k := 1; k <= 7; k++ {
		mulXkSSE(xr[k], X10, k, X11, X12, X9)
		MOVOU(xr[k], mem(R9, 16*k))
	}

	Label("loop8")
	CMPQ(R8, U32(128))
	JB(LabelRef("tail"))
	MOVOU(mem(RAX, 0), X8)
	for i := 0; i < 8; i++ {
		MOVOU(mem(RCX, 16*i), xr[i])
		PXOR(mem(R9, 16*i), xr[i])
		PXOR(X8, xr[i])
	}
	for r := 1; r <= 14; r++ {
		MOVOU(mem(RAX, 16*r), X8)
		op := d.round
		if r == 14 {
			op = d.last
		}
		for i := 0; i < 8; i++ {
			sse2(op, X8, xr[i])
		}
		if i := r - 1; i < 8 {
			Commentf("Tweak %d of the next iteration: x^8 is a byte shift plus a fold of the top byte.", i)
			a, b := xr[10+2*(i%2)], xr[11+2*(i%2)]
			MOVOU(mem(R9, 16*i), a)
			MOVO(a, b)
			PSRLDQ(U8(15), b)
			PSLLDQ(U8(1), a)
			PCLMULQDQ(U8(0x00), X9, b)
			PXOR(b, a)
			MOVOU(a, mem(R10, 16*i))
		}
	}
	for i := 0; i < 8; i++ {
		PXOR(mem(R9, 16*i), xr[i])
		MOVOU(xr[i], mem(RBX, 16*i))
	}
	XCHGQ(R9, R10)
	ADDQ(U32(128), RCX)
	ADDQ(U32(128), RBX)
	SUBQ(U32(128), R8)
	JMP(LabelRef("loop8"))

	Label("tail")
	Comment("Fewer than 8 blocks left: their tweaks are next in the current buffer.")
	TESTQ(R8, R8)
	JZ(LabelRef("unitdone"))
	Label("tail1")
	MOVOU(mem(RCX, 0), X0)
	PXOR(mem(R9, 0), X0)
	aesniRounds(d, xr[0:1])
	PXOR(mem(R9, 0), X0)
	MOVOU(X0, mem(RBX, 0))
	ADDQ(U32(16), R9)
	ADDQ(U32(16), RCX)
	ADDQ(U32(16), RBX)
	SUBQ(U32(16), R8)
	JNZ(LabelRef("tail1"))

	Label("unitdone")
	DECQ(RSI)
	JNZ(LabelRef("unit"))
	Label("done")
	RET()
}

func genECBAESNI() {
	TEXT("ecbEncAESNI", NOSPLIT, ecbSig)
	Pragma("noescape")
	Doc("ecbEncAESNI encrypts nblocks 16-byte blocks with an encryption schedule (16-byte aligned).",
		"Used for the tweak of a ciphertext-stealing tail, and by tests.")
	loadArgs(false)
	Label("loop8")
	CMPQ(RSI, U32(8))
	JB(LabelRef("tail"))
	for i := 0; i < 8; i++ {
		MOVOU(mem(RCX, 16*i), xr[i])
	}
	aesniRounds(encDir, xr[0:8])
	for i := 0; i < 8; i++ {
		MOVOU(xr[i], mem(RBX, 16*i))
	}
	ADDQ(U32(128), RCX)
	ADDQ(U32(128), RBX)
	SUBQ(U32(8), RSI)
	JMP(LabelRef("loop8"))
	Label("tail")
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	MOVOU(mem(RCX, 0), X0)
	aesniRounds(encDir, xr[0:1])
	MOVOU(X0, mem(RBX, 0))
	ADDQ(U32(16), RCX)
	ADDQ(U32(16), RBX)
	DECQ(RSI)
	JMP(LabelRef("tail"))
	Label("done")
	RET()
}

// ---------------------------------------------------------------------------
// vaes256: VAES + VPCLMULQDQ on YMM (two blocks per register), AVX2.
//
// Register plan, as for aesni but twice as wide: Y0-Y7 data (16 blocks in
// flight), Y8 the current round key, Y9 the 0x87 constant in both lanes,
// Y10-Y14 temporaries, X15 the next unit's encrypted tweak (software
// pipelining); the 16 tweaks live in two 256-byte stack buffers
// (current and next iteration, advanced by x^16 between the AES rounds).
// Only 16 vector registers exist without EVEX. rk points at the schedule
// with every round key broadcast to 32 bytes, so a round key is one load.

// mulXkVEX sets dst = src * x^k (1 <= k <= 56) in every 128-bit lane.
func mulXkVEX(dst, src VecPhysical, k int, t1, t2, poly VecPhysical) {
	VPSRLQ(U8(64-k), src, t1)
	VPSLLQ(U8(k), src, dst)
	VPSLLDQ(U8(8), t1, t2)
	clmul(0x01, poly, t1, t1)
	VPXOR(t2, dst, dst)
	VPXOR(t1, dst, dst)
}

func vaes256Rounds(d dir, regs []VecPhysical) {
	for _, y := range regs {
		VPXOR(mem(RAX, 0), y, y)
	}
	for r := 1; r <= 13; r++ {
		for _, y := range regs {
			vex3("V"+d.round, mem(RAX, 32*r), y, y)
		}
	}
	for _, y := range regs {
		vex3("V"+d.last, mem(RAX, 32*14), y, y)
	}
}

func genVAES256() {
	for _, d := range []dir{encDir, decDir} {
		genXTSVAES256(d)
	}
	genECBVAES256()
}

// nextTweakVEX sets X15 = E_K2(R11:R12), the unit number, and increments
// the counter.
func nextTweakVEX() {
	VMOVQ(R11, X15)
	VPINSRQ(U8(1), R12, X15, X15)
	VPXOR(mem(RDX, 0), X15, X15)
	for r := 1; r <= 13; r++ {
		vex3("VAESENC", mem(RDX, 16*r), X15, X15)
	}
	vex3("VAESENCLAST", mem(RDX, 16*14), X15, X15)
	nextCounter()
}

func genXTSVAES256(d dir) {
	TEXT("xts"+d.suffix+"VAES256", NOSPLIT, xtsSig)
	Pragma("noescape")
	docXTS(fmt.Sprintf("xts%sVAES256 is the XTS kernel for VAES on YMM registers.", d.suffix),
		"rk's round keys are each broadcast to 32 bytes.")
	// Two 16-tweak buffers (current and next) plus slack for 32-byte alignment.
	scratch := AllocLocal(2*256 + 32)
	loadArgs(true)
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	VBROADCASTI128(polyMem, Y9)
	TESTQ(RDX, RDX)
	JZ(LabelRef("unit"))
	nextTweakVEX()

	Label("unit")
	MOVQ(RDI, R8)
	Comment("R9 = current tweak buffer (32-byte aligned), R10 = next.")
	LEAQ(scratch, R9)
	ADDQ(U8(31), R9)
	ANDQ(I8(-32), R9)
	LEAQ(mem(R9, 256), R10)
	TESTQ(RDX, RDX)
	JZ(LabelRef("explicit"))
	VMOVDQA(X15, X10)
	Comment("Start the next unit's tweak unless this is the last unit.")
	CMPQ(RSI, U8(1))
	JE(LabelRef("tweak"))
	nextTweakVEX()
	JMP(LabelRef("tweak"))
	Label("explicit")
	VMOVDQU(mem(R13, 0), X10)
	ADDQ(U32(16), R13)
	Label("tweak")
	Comment("Y10 = [T, T*x]; the tweak pairs of blocks 0..15 are Y10*x^0, x^2 .. x^14,",
		"computed independently into the still unused data registers.")
	mulXkVEX(X11, X10, 1, X12, X13, X9)
	VINSERTI128(U8(1), X11, Y10, Y10)
	VMOVDQU(Y10, mem(R9, 0))
	for j := 1; j <= 7; j++ {
		mulXkVEX(yr[j], Y10, 2*j, Y11, Y12, Y9)
		VMOVDQU(yr[j], mem(R9, 32*j))
	}

	Label("loop16")
	CMPQ(R8, U32(256))
	JB(LabelRef("tail"))
	VMOVDQU(mem(RAX, 0), Y8)
	for i := 0; i < 8; i++ {
		VMOVDQU(mem(RCX, 32*i), yr[i])
		VPXOR(mem(R9, 32*i), yr[i], yr[i])
		VPXOR(Y8, yr[i], yr[i])
	}
	for r := 1; r <= 14; r++ {
		VMOVDQU(mem(RAX, 32*r), Y8)
		op := "V" + d.round
		if r == 14 {
			op = "V" + d.last
		}
		for i := 0; i < 8; i++ {
			vex3(op, Y8, yr[i], yr[i])
		}
		if i := r - 1; i < 8 {
			Commentf("Tweak pair %d of the next iteration: times x^16.", i)
			a, b := yr[10+2*(i%2)], yr[11+2*(i%2)]
			VMOVDQU(mem(R9, 32*i), a)
			VPSRLDQ(U8(14), a, b)
			VPSLLDQ(U8(2), a, a)
			clmul(0x00, Y9, b, b)
			VPXOR(b, a, a)
			VMOVDQU(a, mem(R10, 32*i))
		}
	}
	for i := 0; i < 8; i++ {
		VPXOR(mem(R9, 32*i), yr[i], yr[i])
		VMOVDQU(yr[i], mem(RBX, 32*i))
	}
	XCHGQ(R9, R10)
	ADDQ(U32(256), RCX)
	ADDQ(U32(256), RBX)
	SUBQ(U32(256), R8)
	JMP(LabelRef("loop16"))

	Label("tail")
	Comment("Fewer than 16 blocks: two at a time, tweaks next in the current buffer.")
	Label("tail2")
	CMPQ(R8, U32(32))
	JB(LabelRef("tail1"))
	VMOVDQU(mem(RCX, 0), Y0)
	VPXOR(mem(R9, 0), Y0, Y0)
	vaes256Rounds(d, yr[0:1])
	VPXOR(mem(R9, 0), Y0, Y0)
	VMOVDQU(Y0, mem(RBX, 0))
	ADDQ(U32(32), R9)
	ADDQ(U32(32), RCX)
	ADDQ(U32(32), RBX)
	SUBQ(U32(32), R8)
	JMP(LabelRef("tail2"))

	Label("tail1")
	TESTQ(R8, R8)
	JZ(LabelRef("unitdone"))
	Comment("One block left: its tweak is the low half of the next pair; keys are the low 16 bytes of each entry.")
	VMOVDQU(mem(RCX, 0), X0)
	VPXOR(mem(R9, 0), X0, X0)
	VPXOR(mem(RAX, 0), X0, X0)
	for r := 1; r <= 13; r++ {
		vex3("V"+d.round, mem(RAX, 32*r), X0, X0)
	}
	vex3("V"+d.last, mem(RAX, 32*14), X0, X0)
	VPXOR(mem(R9, 0), X0, X0)
	VMOVDQU(X0, mem(RBX, 0))
	ADDQ(U32(16), RCX)
	ADDQ(U32(16), RBX)

	Label("unitdone")
	DECQ(RSI)
	JNZ(LabelRef("unit"))
	Label("done")
	VZEROUPPER()
	RET()
}

func genECBVAES256() {
	TEXT("ecbEncVAES256", NOSPLIT, ecbSig)
	Pragma("noescape")
	Doc("ecbEncVAES256 encrypts nblocks blocks; rk is the 32-byte-broadcast key table.")
	loadArgs(false)
	Label("loop8")
	CMPQ(RSI, U32(8))
	JB(LabelRef("tail2"))
	for i := 0; i < 4; i++ {
		VMOVDQU(mem(RCX, 32*i), yr[i])
	}
	vaes256Rounds(encDir, yr[0:4])
	for i := 0; i < 4; i++ {
		VMOVDQU(yr[i], mem(RBX, 32*i))
	}
	ADDQ(U32(128), RCX)
	ADDQ(U32(128), RBX)
	SUBQ(U32(8), RSI)
	JMP(LabelRef("loop8"))
	Label("tail2")
	CMPQ(RSI, U32(2))
	JB(LabelRef("tail1"))
	VMOVDQU(mem(RCX, 0), Y0)
	vaes256Rounds(encDir, yr[0:1])
	VMOVDQU(Y0, mem(RBX, 0))
	ADDQ(U32(32), RCX)
	ADDQ(U32(32), RBX)
	SUBQ(U32(2), RSI)
	JMP(LabelRef("tail2"))
	Label("tail1")
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	VMOVDQU(mem(RCX, 0), X0)
	VPXOR(mem(RAX, 0), X0, X0)
	for r := 1; r <= 13; r++ {
		vex3("VAESENC", mem(RAX, 32*r), X0, X0)
	}
	vex3("VAESENCLAST", mem(RAX, 32*14), X0, X0)
	VMOVDQU(X0, mem(RBX, 0))
	Label("done")
	VZEROUPPER()
	RET()
}

// ---------------------------------------------------------------------------
// vaes512: VAES + VPCLMULQDQ on ZMM (four blocks per register), AVX-512
// F+VL+BW (BW for the 512-bit byte shifts).
//
// Register plan (all 32 ZMM registers):
//
//	Z0-Z14   the 15 round keys, each broadcast to all four lanes, loaded once
//	Z15-Z22  data: 8 registers = 32 blocks = 512 bytes in flight
//	Z23-Z30  the 32 tweaks of those blocks
//	X31      the encrypted tweak of the next unit (software pipelining)
//
// The 0x87 constant is a 64-byte memory operand of VPCLMULQDQ. Per 512-byte
// iteration the tweaks advance by x^32 (4-byte lane shift plus one
// VPCLMULQDQ each), using the just-stored data registers as temporaries.
// The last 1-3 blocks of a unit use a masked load/store instead of a scalar
// loop.
//
// Software pipelining of the tweak encryption: as soon as a unit's tweaks
// are derived from X31, the K2 encryption of the next unit's number starts
// into X31. With 512-byte units that 15-round serial chain otherwise left the
// AES unit idle for ~50 cycles per unit (measured: ~30 ns per unit); now it
// runs in the shadow of the current unit's 120 data rounds.

func genVAES512() {
	for _, d := range []dir{encDir, decDir} {
		genXTSVAES512(d)
	}
	genECBVAES512()
}

func loadKeys512() {
	for r := 0; r < 15; r++ {
		VBROADCASTI32X4(mem(RAX, 16*r), zr[r])
	}
}

func vaes512Rounds(d dir, regs []VecPhysical) {
	for _, z := range regs {
		VPXORQ(Z0, z, z)
	}
	for r := 1; r <= 13; r++ {
		for _, z := range regs {
			vex3("V"+d.round, zr[r], z, z)
		}
	}
	for _, z := range regs {
		vex3("V"+d.last, Z14, z, z)
	}
}

// mulXkEVEX sets dst = src * x^k (1 <= k <= 56) in every lane.
func mulXkEVEX(dst, src VecPhysical, k int, t1, t2 VecPhysical) {
	VPSRLQ(U8(64-k), src, t1)
	VPSLLQ(U8(k), src, dst)
	VPSLLDQ(U8(8), t1, t2)
	clmul(0x01, poly4Mem, t1, t1)
	VPTERNLOGQ(U8(0x96), t2, t1, dst) // dst ^= t1 ^ t2
}

// kmaskBlocks sets K1 to cover the low R8/16 (1..3) blocks of a ZMM register,
// as a qword mask: (1 << (R8/8)) - 1.
func kmaskBlocks() {
	MOVQ(R8, R9)
	SHRQ(U8(3), R9)
	XORQ(R10, R10)
	BTSQ(R9, R10)
	DECQ(R10)
	KMOVW(R10L, K1)
}

// nextTweak512 sets X31 = E_K2(R11:R12), the unit number (K2 keys from
// memory: Z0-Z14 hold K1), and increments the counter. X31 needs EVEX
// encodings; the two 64-bit halves are merged with K2 = 0b01.
func nextTweak512() {
	VPBROADCASTQ(R12, X31)
	VPBROADCASTQ(R11, K2, X31)
	VPXORQ(mem(RDX, 0), X31, X31)
	for r := 1; r <= 13; r++ {
		vex3("VAESENC", mem(RDX, 16*r), X31, X31)
	}
	vex3("VAESENCLAST", mem(RDX, 16*14), X31, X31)
	nextCounter()
}

func genXTSVAES512(d dir) {
	TEXT("xts"+d.suffix+"VAES512", NOSPLIT, xtsSig)
	Pragma("noescape")
	docXTS(fmt.Sprintf("xts%sVAES512 is the XTS kernel for VAES on ZMM registers.", d.suffix))
	loadArgs(true)
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	loadKeys512()
	TESTQ(RDX, RDX)
	JZ(LabelRef("unit"))
	Comment("K2 = 0b01 for merging the low qword of the counter; X31 = first tweak.")
	MOVL(U32(1), R9L)
	KMOVW(R9L, K2)
	nextTweak512()

	Label("unit")
	MOVQ(RDI, R8)
	TESTQ(RDX, RDX)
	JZ(LabelRef("explicit"))
	VSHUFI64X2(U8(0), Z31, Z31, Z23)
	Comment("Start the next unit's tweak, unless this is the last unit (it would only compete for the AES unit).")
	CMPQ(RSI, U8(1))
	JE(LabelRef("tweak"))
	nextTweak512()
	JMP(LabelRef("tweak"))
	Label("explicit")
	VBROADCASTI32X4(mem(R13, 0), Z23)
	ADDQ(U32(16), R13)
	Label("tweak")
	Comment("Z23 = [T, T*x, T*x^2, T*x^3] via per-qword variable shifts.")
	VPSRLVQ(shrMem, Z23, Z15)
	VPSLLVQ(shlMem, Z23, Z23)
	VPSLLDQ(U8(8), Z15, Z16)
	clmul(0x01, poly4Mem, Z15, Z15)
	VPTERNLOGQ(U8(0x96), Z16, Z15, Z23)
	Comment("Z24..Z30 = Z23*x^4 .. Z23*x^28, independently.")
	for j := 1; j <= 7; j++ {
		t := 15 + 2*(j%4)
		mulXkEVEX(zr[23+j], Z23, 4*j, zr[t], zr[t+1])
	}

	Label("loop32")
	CMPQ(R8, U32(512))
	JB(LabelRef("tail4"))
	for i := 0; i < 8; i++ {
		VPXORQ(mem(RCX, 64*i), zr[23+i], zr[15+i])
	}
	vaes512Rounds(d, zr[15:23])
	for i := 0; i < 8; i++ {
		VPXORQ(zr[23+i], zr[15+i], zr[15+i])
		VMOVDQU64(zr[15+i], mem(RBX, 64*i))
	}
	Comment("Advance every tweak vector by x^32.")
	for i := 0; i < 8; i++ {
		t := zr[15+i]
		VPSRLDQ(U8(12), zr[23+i], t)
		VPSLLDQ(U8(4), zr[23+i], zr[23+i])
		clmul(0x00, poly4Mem, t, t)
		VPXORQ(t, zr[23+i], zr[23+i])
	}
	ADDQ(U32(512), RCX)
	ADDQ(U32(512), RBX)
	SUBQ(U32(512), R8)
	JMP(LabelRef("loop32"))

	Label("tail4")
	Comment("Fewer than 32 blocks: four at a time with Z23, shifting the tweak registers down.")
	CMPQ(R8, U32(64))
	JB(LabelRef("tailmask"))
	VPXORQ(mem(RCX, 0), Z23, Z15)
	vaes512Rounds(d, zr[15:16])
	VPXORQ(Z23, Z15, Z15)
	VMOVDQU64(Z15, mem(RBX, 0))
	for i := 23; i < 30; i++ {
		VMOVDQA64(zr[i+1], zr[i])
	}
	ADDQ(U32(64), RCX)
	ADDQ(U32(64), RBX)
	SUBQ(U32(64), R8)
	JMP(LabelRef("tail4"))

	Label("tailmask")
	TESTQ(R8, R8)
	JZ(LabelRef("unitdone"))
	Comment("1-3 blocks: masked load and store (masked-off lanes are neither read nor written).")
	kmaskBlocks()
	VMOVDQU64_Z(mem(RCX, 0), K1, Z15)
	VPXORQ(Z23, Z15, Z15)
	vaes512Rounds(d, zr[15:16])
	VPXORQ(Z23, Z15, Z15)
	VMOVDQU64(Z15, K1, mem(RBX, 0))
	ADDQ(R8, RCX)
	ADDQ(R8, RBX)

	Label("unitdone")
	DECQ(RSI)
	JNZ(LabelRef("unit"))
	Label("done")
	VZEROUPPER()
	RET()
}

func genECBVAES512() {
	TEXT("ecbEncVAES512", NOSPLIT, ecbSig)
	Pragma("noescape")
	Doc("ecbEncVAES512 encrypts nblocks blocks with VAES on ZMM registers.")
	loadArgs(false)
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	loadKeys512()
	Label("loop16")
	CMPQ(RSI, U32(16))
	JB(LabelRef("tail4"))
	for i := 0; i < 4; i++ {
		VMOVDQU64(mem(RCX, 64*i), zr[15+i])
	}
	vaes512Rounds(encDir, zr[15:19])
	for i := 0; i < 4; i++ {
		VMOVDQU64(zr[15+i], mem(RBX, 64*i))
	}
	ADDQ(U32(256), RCX)
	ADDQ(U32(256), RBX)
	SUBQ(U32(16), RSI)
	JMP(LabelRef("loop16"))
	Label("tail4")
	CMPQ(RSI, U32(4))
	JB(LabelRef("tailmask"))
	VMOVDQU64(mem(RCX, 0), Z15)
	vaes512Rounds(encDir, zr[15:16])
	VMOVDQU64(Z15, mem(RBX, 0))
	ADDQ(U32(64), RCX)
	ADDQ(U32(64), RBX)
	SUBQ(U32(4), RSI)
	JMP(LabelRef("tail4"))
	Label("tailmask")
	TESTQ(RSI, RSI)
	JZ(LabelRef("done"))
	MOVQ(RSI, R8)
	SHLQ(U8(4), R8) // bytes left, for kmaskBlocks
	kmaskBlocks()
	VMOVDQU64_Z(mem(RCX, 0), K1, Z15)
	vaes512Rounds(encDir, zr[15:16])
	VMOVDQU64(Z15, K1, mem(RBX, 0))
	Label("done")
	VZEROUPPER()
	RET()
}
