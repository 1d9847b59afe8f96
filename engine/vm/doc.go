// Package vm is the VM directory model: what a directory's .vmx and
// descriptors say about its files (Layout, Disk, DataFile), the
// conversion journal that makes operations resumable after kill -9, the
// read-only VM status, and Decide, the pure FORMAT.md section 5 decision
// "may this file be served decrypted, and under which key?" (one Clause
// per verdict; refusals are *RefusedError).
package vm
