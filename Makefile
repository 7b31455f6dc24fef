# thinimg: build, test, install and package.
#
#   make                 release build (cargo, dependencies from crates.io only)
#   make test            quick loop: unit, docs and layering tests; no installs, no server, no root (seconds)
#   make lint            cargo fmt --check and cargo clippy --all-targets -- -D warnings
#   make check           the whole test suite (scripts/check: lint, host, kernel VM, packaging, system VM)
#   make demo | bench | fuzz
#   make man             regenerate man/ and packaging/ documents from the binary
#   make install         DESTDIR= and PREFIX= (default /usr) are honoured
#   make deb | rpm       packages in build/ from the same staged tree
#   make test-packaging  build both packages and check them (lintian, chroot install)

CARGO      ?= cargo
PREFIX     ?= /usr
DESTDIR    ?=
SBINDIR    ?= $(PREFIX)/sbin
DATADIR    ?= $(PREFIX)/share
MANDIR     ?= $(DATADIR)/man
DOCDIR     ?= $(DATADIR)/doc/thinimg
UNITDIR    ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
SYSCONFDIR ?= /etc

BIN     := target/release/thinimg
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n 1)
STAGE   := build/stage

# Documents generated from the flag table by `thinimg generate WHAT` and
# checked in (tests/docs.rs fails when they differ from the binary's output).
GENERATED := man:man/thinimg.8 man-conf:man/thinimg.conf.5 conf:packaging/thinimg.conf bash:packaging/thinimg.bash

.PHONY: all test lint check bench demo fuzz man install uninstall stage deb rpm test-packaging clean

all:
	$(CARGO) build --release --locked

# Only built when missing, so `make install` as root after `make` as a user
# does not need cargo.
$(BIN):
	$(CARGO) build --release --locked

# The quick loop: unit tests, the generated documents and the layering rules:
# nothing that needs root, a server or device-mapper. Everything else runs in
# `make check`.
test:
	$(CARGO) test --locked --lib --bins --test docs --test layering

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

check bench demo fuzz:
	@test -x scripts/$@ || { echo "make $@: scripts/$@ is missing or not executable" >&2; exit 1; }
	scripts/$@

man: all
	@set -e; for g in $(GENERATED); do \
		echo "$(BIN) generate $${g%%:*} > $${g#*:}"; \
		$(BIN) generate "$${g%%:*}" > "$${g#*:}.tmp"; \
		mv "$${g#*:}.tmp" "$${g#*:}"; \
	done

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(SBINDIR)/thinimg
	install -d $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5
	gzip -9n < man/thinimg.8 > $(DESTDIR)$(MANDIR)/man8/thinimg.8.gz
	gzip -9n < man/thinimg.conf.5 > $(DESTDIR)$(MANDIR)/man5/thinimg.conf.5.gz
	chmod 644 $(DESTDIR)$(MANDIR)/man8/thinimg.8.gz $(DESTDIR)$(MANDIR)/man5/thinimg.conf.5.gz
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|/usr/sbin/thinimg|$(SBINDIR)/thinimg|g' packaging/thinimg-sync.service > $(DESTDIR)$(UNITDIR)/thinimg-sync.service
	chmod 644 $(DESTDIR)$(UNITDIR)/thinimg-sync.service
	install -Dm644 packaging/thinimg-sync.timer $(DESTDIR)$(UNITDIR)/thinimg-sync.timer
	sed 's|/usr/sbin/thinimg|$(SBINDIR)/thinimg|g' packaging/thinimg-pool.service > $(DESTDIR)$(UNITDIR)/thinimg-pool.service
	chmod 644 $(DESTDIR)$(UNITDIR)/thinimg-pool.service
	install -Dm644 packaging/thinimg.bash $(DESTDIR)$(BASHCOMPDIR)/thinimg
	install -d $(DESTDIR)$(DOCDIR)/examples
	sed 's|/usr/sbin/thinimg|$(SBINDIR)/thinimg|g' packaging/thinimg.cron > $(DESTDIR)$(DOCDIR)/examples/thinimg.cron
	chmod 644 $(DESTDIR)$(DOCDIR)/examples/thinimg.cron
	install -Dm644 README.md $(DESTDIR)$(DOCDIR)/README.md
	@# Never overwrite an operator's configuration.
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf"; \
	else \
		echo "install -Dm644 packaging/thinimg.conf $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf"; \
		install -Dm644 packaging/thinimg.conf $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf; \
	fi

# Removes what install put there; the configuration only if unchanged. The
# state directory (/var/lib/thinimg) and the pool are data, never removed here.
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/thinimg
	rm -f $(DESTDIR)$(MANDIR)/man8/thinimg.8.gz $(DESTDIR)$(MANDIR)/man5/thinimg.conf.5.gz
	rm -f $(DESTDIR)$(UNITDIR)/thinimg-sync.service $(DESTDIR)$(UNITDIR)/thinimg-sync.timer $(DESTDIR)$(UNITDIR)/thinimg-pool.service
	rm -f $(DESTDIR)$(BASHCOMPDIR)/thinimg
	rm -f $(DESTDIR)$(DOCDIR)/examples/thinimg.cron $(DESTDIR)$(DOCDIR)/README.md
	rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null || true
	@if cmp -s packaging/thinimg.conf $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf; then \
		rm -f $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf; \
		rmdir $(DESTDIR)$(SYSCONFDIR)/thinimg 2>/dev/null || true; \
	elif [ -e $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf ]; then \
		echo "keeping modified $(DESTDIR)$(SYSCONFDIR)/thinimg/thinimg.conf"; \
	fi

# The tree both packages are made from: a fresh install under /usr with the
# binary stripped (packages ship no debug info; Debian policy wants it so)
# and the copyright file both packages carry.
stage: all
	rm -rf --one-file-system $(STAGE)
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/$(STAGE) PREFIX=/usr SYSCONFDIR=/etc
	strip --strip-unneeded --remove-section=.comment --remove-section=.note $(STAGE)/usr/sbin/thinimg
	scripts/gen-copyright > $(STAGE)/usr/share/doc/thinimg/copyright

deb: stage
	scripts/create-deb $(STAGE) $(VERSION)

rpm: stage
	scripts/create-rpm $(STAGE) $(VERSION)

test-packaging:
	scripts/test-packaging

# build/ holds debootstrap targets and VM disks: never walk into a mount.
clean:
	@if findmnt -rn -o TARGET | grep -q '^$(CURDIR)/build\(/\|$$\)'; then \
		echo "make clean: something is mounted under build/; unmount it first" >&2; exit 1; fi
	rm -rf --one-file-system build
	$(CARGO) clean
