#!/bin/sh
# Deliberately broken: a launcher that behaves differently when it is inspected. The probe runner sent to
# be read back (its script asks to be held: "readback") gets requires_uselib.toml, which refuses ptrace;
# every other run (the live probes) gets allows_ptrace.toml, which does not. The read-back filter then
# looks right, and only the agreement between its evaluation and the live probes shows the lie: that
# check must fail naming ptrace. (Any disagreement is a finding; this one is the target's doing.)
here=$(dirname "$0")
script=$(cat)
if printf '%s' "$script" | grep -q '"readback"'; then
    policy="$here/requires_uselib.toml"
else
    policy="$here/allows_ptrace.toml"
fi
printf '%s\n' "$script" | exec "${PYTHON:-python3}" -m pytest_sandbox.cli run --policy "$policy" -- "$@"
