// Package nbd is a Network Block Device server (fixed newstyle
// negotiation, structured replies, base:allocation block status,
// STARTTLS) per NetworkBlockDevice doc/proto.md. It serves a Backend, a
// small block-device interface, and knows nothing of keys or files.
// docs/NBD.md lists what is implemented.
package nbd

// Wire constants from doc/proto.md.
const (
	magicNBD        = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt        = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply   = 0x3e889045565a9
	magicRequest    = 0x25609513
	magicSimple     = 0x67446698
	magicStructured = 0x668e33ef

	// handshake flags (server) and client flags
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	// options
	optExportName     = 1
	optAbort          = 2
	optList           = 3
	optStartTLS       = 5
	optInfo           = 6
	optGo             = 7
	optStructuredRepl = 8
	optListMetaCtx    = 9
	optSetMetaCtx     = 10

	// option replies
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrTLSReqd  = 1<<31 + 5
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7
	repErrTooBig   = 1<<31 + 9

	// NBD_INFO_*
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	// transmission flags
	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendFUA      = 1 << 3
	tflagSendTrim     = 1 << 5
	tflagSendWriteZer = 1 << 6
	tflagSendDF       = 1 << 7
	tflagCanMultiConn = 1 << 8

	// command flags
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	// commands
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// structured reply
	replyFlagDone        = 1 << 0
	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 + 1

	// errors
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// State flags of the base:allocation context.
const (
	StateHole = 1 << 0 // not allocated in the backing store
	StateZero = 1 << 1 // reads as zeros
)

// metaBaseAllocation is the one metadata context served, with id 1.
const (
	metaBaseAllocation   = "base:allocation"
	metaBaseAllocationID = 1
)
