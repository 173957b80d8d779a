"""The hypervisor seam: libvirt access (libvirt_host over libvirt_conn, the only modules importing libvirt),
pure domain XML."""
