#!/usr/bin/env bash
# The README's run command: a lab KMS and a daemon with host encryption mode
# on, an encrypted demo VM in the lab datastore, and its decrypted view
# mounted -- all under ./demo. Re-running restarts the lab with the same keys.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${DEMO_DIR:-$PWD/demo}"
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (the daemon mlocks keys and mounts a FUSE view)" >&2
	exit 1
fi
bin=$PWD/bin/vmcryptd
"$bin" lab up --dir "$dir" >/dev/null
export VMCRYPTD_SOCKET="$dir/vmcryptd.sock"
vm="$dir/datastore/demo"
if [ ! -d "$vm" ]; then
	"$bin" vm create "$vm" --name demo --memory 1G --disk 1G --disk 256M:monolithicSparse --encrypt
fi
if ! mountpoint -q "$dir/view"; then
	"$bin" mount lab "$dir/view"
fi
echo
cat "$dir/lab.env"
echo
"$bin" vm status "$vm"
cat <<EOT

The demo VM is encrypted at rest in $vm
and decrypted in the view $dir/view/demo. Try:

  source $dir/lab.env
  qemu-img info $dir/view/demo/demo.vmdk          # the decrypted disk
  qemu-io -c 'write -P 0xab 0 1M' $dir/view/demo/demo.vmdk
  $bin inspect $vm/demo-flat.vmdk            # ciphertext at rest
  $bin status
  $bin vm rekey $vm                          # shallow rekey (new KEK)
  $bin bench                                 # sector cipher vs OpenSSL
  $bin lab down --dir $dir                   # unmounts, stops daemon and KMS
EOT
