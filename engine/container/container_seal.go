package container

// Seal closes c like Close (a pending header is written, the file closed,
// the per-file keys zeroed) after waiting for every read and write in
// progress on it, so none of them runs with keys being zeroed under it.
// Later reads and writes fail. `vmcryptd lock` seals the containers that
// views have open.
func (c *Container) Seal() error {
	c.resize.Lock() // held shared by every read and write
	defer c.resize.Unlock()
	return c.Close()
}
