# vmcryptd build, test and demo targets. `make test` is the one command CI
# runs (.ci/run); `make demo` is the README's run command.
GO       ?= go
BIN      := bin/vmcryptd
PKGS     := ./...
# The whole suite must stay well inside CI's budget on 2 cores.
TEST_TIMEOUT ?= 20m
FUZZTIME ?= 3m

# Install layout (make install PREFIX=/usr DESTDIR=/tmp/stage). The config
# stays under /etc whatever the prefix, as vmcryptd.service expects.
PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR     ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
MANDIR     ?= $(PREFIX)/share/man
UNITDIR    ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
VERSION    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

.PHONY: all build test vet deps bench demo fuzz crash generate clean install deb systemd-e2e guest

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/vmcryptd

# The man page and completions come from the built binary (generated from
# its command line definition). An existing config is never overwritten.
install: build
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/vmcryptd
	install -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/vmcryptd
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
		packaging/systemd/vmcryptd.service.in > $(DESTDIR)$(UNITDIR)/vmcryptd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/vmcryptd.service
	$(BIN) man | gzip -9n > $(DESTDIR)$(MANDIR)/man8/vmcryptd.8.gz
	$(BIN) completion bash > $(DESTDIR)$(BASHCOMPDIR)/vmcryptd
	$(BIN) completion zsh > $(DESTDIR)$(ZSHCOMPDIR)/_vmcryptd
	$(BIN) completion fish > $(DESTDIR)$(FISHCOMPDIR)/vmcryptd.fish
	chmod 0644 $(DESTDIR)$(MANDIR)/man8/vmcryptd.8.gz $(DESTDIR)$(BASHCOMPDIR)/vmcryptd \
		$(DESTDIR)$(ZSHCOMPDIR)/_vmcryptd $(DESTDIR)$(FISHCOMPDIR)/vmcryptd.fish
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/vmcryptd/vmcryptd.toml ]; then \
		echo "install: keeping existing $(DESTDIR)$(SYSCONFDIR)/vmcryptd/vmcryptd.toml; example at $(DESTDIR)$(SYSCONFDIR)/vmcryptd/vmcryptd.toml.example"; \
		install -m 0644 etc/vmcryptd/vmcryptd.toml $(DESTDIR)$(SYSCONFDIR)/vmcryptd/vmcryptd.toml.example; \
	else \
		install -m 0644 etc/vmcryptd/vmcryptd.toml $(DESTDIR)$(SYSCONFDIR)/vmcryptd/vmcryptd.toml; \
	fi

# A Debian package in $(DEBDIR), built with dpkg-deb
# (packaging/debian/build-deb.sh); the version comes from git describe.
DEBDIR ?= bin
deb: build
	./packaging/debian/build-deb.sh "$(VERSION)" "$(DEBDIR)"

deps:
	./scripts/install-deps.sh

# gofmt, go vet and staticcheck (a pinned version, fetched through the
# module proxy like every dependency) must all be clean.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

test: deps vet
	$(GO) test -race -timeout $(TEST_TIMEOUT) $(PKGS)

# Opt-in: boot a QEMU guest (TCG) on a disk made through the view, with
# cache=none and aio=native / aio=io_uring (about 10 s; needs
# qemu-system-x86, busybox-static and a Debian kernel, installed here).
guest:
	./scripts/install-deps.sh guest
	VMCRYPTD_GUEST=1 $(GO) test -race -count=1 -run 'TestQemuGuestBoot' -v ./fusefs/

# Sector-cipher throughput against OpenSSL, measured in the same run.
bench: build
	$(BIN) bench

# Regenerate the assembly from its avo generator.
generate:
	$(GO) generate ./engine/xts/

# vmcryptd.service under a real systemd as PID 1 (opt-in: root, builds a
# Debian root file system once; see packaging/systemd/e2e/run.sh).
systemd-e2e:
	rm -rf bin/e2e
	$(MAKE) deb DEBDIR=bin/e2e
	./packaging/systemd/e2e/run.sh bin/e2e/vmcryptd_*.deb

# Long fuzzing campaign (opt-in, not part of `make test`).
fuzz:
	./scripts/fuzz-all.sh $(FUZZTIME)

# Long kill -9 campaign over encrypt / deep rekey / decrypt and over
# writes, overwrites and truncates through the view (opt-in).
CRASH_ITER ?= 50
crash: deps
	VMCRYPTD_CRASH_ITER=$(CRASH_ITER) $(GO) test -count=1 -timeout 60m -run "TestCrash(Resume|ViewWrites)" -v ./cmd/vmcryptd/

demo: build deps
	./scripts/demo.sh

clean:
	rm -rf bin
