#!/bin/sh
# Deliberately broken: "root" in a user namespace of its own (unshare --user --map-root-user), with a filter
# that refuses only uselib (allows_ptrace.toml). Every capability check against the initial user namespace
# (mount, fsopen, pivot_root, bpf, ...) then fails with EPERM, which looks like a filter's refusal unless the
# baseline is taken in a user namespace too. It must earn no BLOCKED on the native ABI: its only real
# refusals are the filter's kill of every x32 and i386 call (bad_arch_action) and uselib.
here=$(dirname "$0")
script=$(cat)
printf '%s\n' "$script" | exec unshare --user --map-root-user -- "${PYTHON:-python3}" -m pytest_sandbox.cli run \
    --policy "$here/allows_ptrace.toml" -- "$@"
