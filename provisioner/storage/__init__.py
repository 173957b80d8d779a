"""Per-instance disks on the shared storage (qcow2 overlays over catalogue images)."""
