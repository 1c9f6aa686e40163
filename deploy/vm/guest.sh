#!/bin/bash
# Stage 2, PID 1 of the VM, in the host's root (read-only 9p under a tmpfs overlay): mount the
# kernel filesystems with ONLY the unified cgroup hierarchy, enable the controllers Roost uses,
# run the scenario the harness wrote (run.sh), leave its output and exit status in the results
# folder, and power off. Whatever happens, the VM powers off: the harness waits for that.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
results=/roost-vm-results

power_off() {
  sync
  echo o > /proc/sysrq-trigger
  sleep 30
}
trap power_off EXIT

mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
# cgroup v2 only: the harness boots with cgroup_no_v1=all, and nothing mounts a v1 hierarchy.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu +io" > /sys/fs/cgroup/cgroup.subtree_control
ip link set lo up
hostname roost-vm

{
  echo "kernel: $(uname -r)"
  echo "cgroup mounts: $(grep cgroup /proc/self/mounts | tr '\n' ';')"
  echo "root subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
  echo "hypervisor: $(dmesg | grep -m1 -o 'Hypervisor detected: .*' || echo none)"
} > "$results/guest-info"
cat "$results/guest-info" > /dev/console
# The tests run as systemd (>= 254) runs a service with Delegate=yes and DelegateSubgroup=agent:
# in the leaf `agent` of a delegated group, so each agent they start finds itself in its leaf and
# puts its sites beside it (docs/cgroups.md). A child of this shell, which as PID 1 reaps orphans.
service=/sys/fs/cgroup/roost-tests.service
mkdir -p "$service/agent"
echo "cgroup of the tests: ${service#/sys/fs/cgroup}/agent" >> "$results/guest-info"
bash -c 'echo $$ > "$1/agent/cgroup.procs" && exec bash "$2"' _ "$service" "$results/run.sh" \
  > "$results/output" 2>&1 &
wait $!
echo $? > "$results/status"
dmesg > "$results/dmesg"
