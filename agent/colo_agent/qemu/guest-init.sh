#!/bin/busybox sh
# /init of the qemu backend's Linux test guest: redis-server with its data in
# RAM and its append-only file on the replicated disk (/dev/vda or /dev/sda).
# The network is QEMU's user-mode network: 10.0.2.15, gateway 10.0.2.2.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done </lib/modules/load-order
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
for i in 1 2 3 4 5 6 7 8 9 10; do
    for d in vda sda; do [ -b /dev/$d ] && disk=/dev/$d && break 2; done
    sleep 0.2
done
if [ -n "${disk:-}" ] && mount -t ext4 -o noatime "$disk" /data; then
    echo "colo-guest: $disk mounted on /data"
else
    echo "colo-guest: no replicated disk; append-only file in RAM"
fi
echo "colo-guest: starting redis-server"
redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --save "" --dir /data \
    --appendonly yes --appendfsync always --enable-debug-command yes --daemonize no &
wait
echo "colo-guest: redis-server exited; powering off"
poweroff -f
