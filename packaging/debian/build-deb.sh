#!/usr/bin/env bash
# build-deb.sh GITVERSION OUTDIR: builds OUTDIR/vmcryptd_<version>_<arch>.deb
# with dpkg-deb from a `make install DESTDIR=...` tree. Called by `make deb`.
set -euo pipefail

gitver=${1:?usage: build-deb.sh GITVERSION OUTDIR}
out=${2:?usage: build-deb.sh GITVERSION OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

# Debian versions must start with a digit: v1.2.3-4-gabcdef -> 1.2.3+4.gabcdef;
# a bare commit (no tag yet) -> 0~git.abcdef; "-dirty" -> "+dirty".
debver=$gitver
debver=${debver#v}
debver=${debver/-dirty/+dirty}
if [[ $debver =~ ^([0-9][^-]*)-([0-9]+)-(g[0-9a-f]+)(.*)$ ]]; then
	debver="${BASH_REMATCH[1]}+${BASH_REMATCH[2]}.${BASH_REMATCH[3]}${BASH_REMATCH[4]}"
elif [[ ! $debver =~ ^[0-9] ]]; then
	debver="0~git.$debver"
fi
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
make -C "$top" --no-print-directory install DESTDIR="$stage" PREFIX=/usr SYSCONFDIR=/etc \
	UNITDIR=/usr/lib/systemd/system ZSHCOMPDIR=/usr/share/zsh/vendor-completions VERSION="$gitver" >/dev/null

install -d -m 0755 "$stage/DEBIAN" "$stage/usr/share/doc/vmcryptd"
install -m 0644 "$top/README.md" "$stage/usr/share/doc/vmcryptd/README.md"
install -m 0644 "$top/docs/FORMAT.md" "$stage/usr/share/doc/vmcryptd/FORMAT.md"
[ -f "$top/docs/METRICS.md" ] && install -m 0644 "$top/docs/METRICS.md" "$stage/usr/share/doc/vmcryptd/METRICS.md"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$debver|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" "$here/control.in" > "$stage/DEBIAN/control"
# The config is the administrator's: dpkg keeps their edits on upgrade
# and asks before replacing it.
echo /etc/vmcryptd/vmcryptd.toml > "$stage/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/control"

mkdir -p "$out"
deb="$out/vmcryptd_${debver}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
