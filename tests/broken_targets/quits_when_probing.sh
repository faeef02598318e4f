#!/bin/sh
# Deliberately broken: a launcher that answers the identity pre-flight (the runner with an empty plan)
# and then exits at once, running nothing, whenever it is given probes. Nothing was probed, so the
# syscall category must earn no pass at all (issue #10 item 4: "reported 0 of 113 probes" was WORKS).
script=$(cat)
[ -n "${LAUNCH_LOG:-}" ] && echo "$$" >> "$LAUNCH_LOG"  # how often the harness started it
case "$script" in
    *"main([])"*) printf '%s\n' "$script" | "$@"; exit $? ;;
esac
exit 0
