#!/bin/sh
# Deliberately broken: a launcher that answers the identity pre-flight and then hangs whenever it is given
# probes, with a grandchild of its own that would outlive it (issue #10 item 3). The harness must end the
# category in bounded time with one failure that says so, and leave no process behind.
script=$(cat)
[ -n "${LAUNCH_LOG:-}" ] && echo "$$" >> "$LAUNCH_LOG"  # how often the harness started it
case "$script" in
    *"main([])"*) printf '%s\n' "$script" | "$@"; exit $? ;;
esac
sleep 3600 &
exec sleep 3600
