# vmcryptd build, test and demo targets. `make test` is the one command CI
# runs (.ci/run); `make demo` is the README's run command.
GO       ?= go
BIN      := bin/vmcryptd
PKGS     := ./...
# The whole suite must stay well inside CI's budget on 2 cores.
TEST_TIMEOUT ?= 20m
FUZZTIME ?= 3m

.PHONY: all build test vet deps bench demo fuzz crash generate clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/vmcryptd

deps:
	./scripts/install-deps.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet $(PKGS)

test: deps vet
	$(GO) test -race -timeout $(TEST_TIMEOUT) $(PKGS)

# Sector-cipher throughput against OpenSSL, measured in the same run.
bench: build
	$(BIN) bench

# Regenerate the assembly from its avo generator.
generate:
	$(GO) generate ./engine/xts/

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
