package api

// LockResult answers POST /v1/lock (vmcryptd lock).
type LockResult struct {
	// KEKsZeroed counts the KEKs zeroed in the daemon's keyring.
	KEKsZeroed int `json:"keks_zeroed"`
	// Views counts the mounted views whose DEK caches were zeroed and
	// whose open encrypted files were sealed.
	Views int `json:"views"`
	// FilesSealed counts encrypted files that were open in views: their
	// handles now answer EACCES.
	FilesSealed int `json:"files_sealed"`
	// PagesInvalidated counts files whose kernel page cache was dropped.
	PagesInvalidated int `json:"files_invalidated"`
	// AlreadyLocked says the daemon was locked before this request.
	AlreadyLocked bool `json:"already_locked"`
}

// UnlockResult answers POST /v1/unlock (vmcryptd unlock).
type UnlockResult struct {
	WasLocked bool `json:"was_locked"`
	// Loaded lists the KEKs fetched again; Failed those that could not be
	// (the retry loop keeps trying them).
	Loaded []string     `json:"loaded"`
	Failed []KeyFailure `json:"failed"`
}

// KeyFailure is one KEK that could not be fetched, with the reason.
type KeyFailure struct {
	Key   string `json:"key"`
	Error string `json:"error"`
}

// ReloadResult answers POST /v1/reload (vmcryptd reload, SIGHUP).
type ReloadResult struct {
	Config string `json:"config"`
	// Applied lists the sections that changed and now run ("roles",
	// "datastores", ...), in the order of the file's reference.
	Applied []string `json:"applied"`
	// Changes says what the reload did, one line per change ("datastore
	// ds2 (/srv/ds2) added", "view of /srv/ds2 mounted on /mnt/ds2", ...).
	Changes []string `json:"changes"`
}
