#!/bin/sh
# Runs inside the nested guest (chrooted into the 9p root): load VFIO and the NIC drivers,
# make the igb VFs, bind the devices under test to vfio-pci, then run the checks with pytest.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/run/xchg/site PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export HOME=/tmp LANG=C.UTF-8
stamp() { echo "at $(cut -d" " -f1 /proc/uptime) s: $1"; }
stamp "checks start"
for m in vfio vfio_iommu_type1 vfio-pci igb e1000; do modprobe "$m" || echo "modprobe $m failed"; done
stamp "modules loaded"
echo 2 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs || echo "making the VFs failed"
stamp "VFs made"
to_vfio() {
    dev=/sys/bus/pci/devices/$1
    [ -e "$dev/driver" ] && echo "$1" > "$dev/driver/unbind"
    echo vfio-pci > "$dev/driver_override"
    echo "$1" > /sys/bus/pci/drivers_probe
}
# The two e1000 behind the PCIe-to-PCI bridge share an IOMMU group: the first goes to
# vfio-pci, the second stays on e1000, so that group is not viable.
# (shell builtins where they do: every process started costs under TCG)
bridged=""
for d in /sys/bus/pci/devices/*; do  # the glob is sorted
    read -r id < "$d/device"
    [ "$id" = 0x100e ] && bridged="$bridged ${d##*/}"
done
echo $bridged > /run/xchg/bridged.txt
set -- $bridged
for bdf in 0000:01:10.0 0000:01:10.2 0000:00:02.0 ${1:-}; do
    to_vfio "$bdf"
done
ls -l /dev/vfio
for d in /sys/bus/pci/devices/*; do
    read -r vendor < "$d/vendor"
    read -r id < "$d/device"
    group=$(readlink "$d/iommu_group")
    driver=$(readlink "$d/driver" 2>/dev/null)
    echo "${d##*/} $vendor:$id group=${group##*/} driver=${driver##*/}"
done
stamp "devices bound"
# The project comes in as source (installed on the host by another Python): compile it once
# here, or every Python process the checks start compiles it again.
python3 -m compileall -q -j 2 /run/xchg/site > /dev/null || echo "compileall failed"
stamp "project compiled"
cd /tmp
python3 -m pytest -c /dev/null --rootdir /tmp -p no:cacheprovider -o python_files='check_*.py' \
    -o junit_family=xunit1 --junitxml=/run/xchg/junit.xml -q -rA \
    /mnt/checkout/tests/vfio_pci/guest 2>&1
status=$?
stamp "pytest done"
echo "pytest exited $status"
