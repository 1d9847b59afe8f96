package daemon

import "testing"

// A conversion's VM directory is busy, and so are paths inside it and
// the directories holding it (renaming one would move the VM from under
// the conversion); siblings are not.
func TestVMLocksIsBusy(t *testing.T) {
	var l vmLocks
	if err := l.acquire("/ds/vm", "vm.encrypt"); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{
		"/ds/vm": true, "/ds/vm/vm.vmx": true, "/ds/vm/sub/x": true, "/ds": true,
		"/ds/vm2": false, "/ds/vm2/vm.vmx": false, "/ds/v": false, "/other": false,
	} {
		if got := l.isBusy(p); got != want {
			t.Errorf("isBusy(%s) = %v, want %v", p, got, want)
		}
	}
	l.release("/ds/vm")
	if l.isBusy("/ds/vm/vm.vmx") {
		t.Error("busy after release")
	}
}
