"""The hypervisor seam: libvirt access (libvirt_host, the only module importing libvirt), pure domain XML."""
