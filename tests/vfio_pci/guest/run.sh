#!/bin/sh
# Runs inside the nested guest (chrooted into the 9p root): load VFIO and the NIC drivers,
# make the igb VFs, bind the devices under test to vfio-pci, then run the checks with pytest.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/run/xchg/site PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export HOME=/tmp LANG=C.UTF-8
t0=$(date +%s.%N)
for m in vfio vfio_iommu_type1 vfio-pci igb e1000; do modprobe "$m" || echo "modprobe $m failed"; done
echo 2 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs || echo "making the VFs failed"
to_vfio() {
    dev=/sys/bus/pci/devices/$1
    [ -e "$dev/driver" ] && echo "$1" > "$dev/driver/unbind"
    echo vfio-pci > "$dev/driver_override"
    echo "$1" > /sys/bus/pci/drivers_probe
}
# The two e1000 behind the PCIe-to-PCI bridge share an IOMMU group: the first goes to
# vfio-pci, the second stays on e1000, so that group is not viable.
bridged=$(ls -d /sys/bus/pci/devices/*/ | while read d; do
    [ "$(cat $d/device)" = 0x100e ] && basename "$d"; done | sort)
echo "$bridged" > /run/xchg/bridged.txt
for bdf in 0000:01:10.0 0000:01:10.2 0000:00:02.0 $(echo "$bridged" | head -n 1); do
    to_vfio "$bdf"
done
ls -l /dev/vfio
for d in /sys/bus/pci/devices/*; do
    echo "$(basename $d) $(cat $d/vendor):$(cat $d/device) group=$(basename "$(readlink $d/iommu_group)") driver=$(basename "$(readlink $d/driver)" 2>/dev/null)"
done
echo "setup took $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo ?) s"
cd /tmp
python3 -m pytest -c /dev/null --rootdir /tmp -p no:cacheprovider -o python_files='check_*.py' \
    -o junit_family=xunit1 --junitxml=/run/xchg/junit.xml -q -rA \
    /mnt/checkout/tests/vfio_pci/guest 2>&1
echo "pytest exited $?"
