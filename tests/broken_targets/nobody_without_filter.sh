#!/bin/sh
# A "sandbox" that only drops privileges: uid and gid 65534, no supplementary groups, no capabilities
# (inheritable and bounding sets cleared too), and NO seccomp filter. The kernel itself refuses this
# caller fsopen, fsmount, fspick, move_mount and pivot_root with EPERM, which a baseline taken as root
# mistook for a filter's refusal (issue #8, item 3). It must earn no BLOCKED and fail filter-present.
exec setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=-all --bounding-set=-all -- "$@"
